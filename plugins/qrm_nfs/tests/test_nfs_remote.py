"""An NFS storage server on another machine, managed over SSH: a storage host (its own
network namespace and /run) runs rpcbind, nfs-ganesha and sshd; the driver reaches it
with a throwaway key and manages volumes, the EXPORT file (checked there by a throwaway
ganesha, then swapped in and reloaded) and the record, in one shell session per change.
libnfs's nfs-ls on the host is the client."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qrm_core.config import Settings
from qrm_core.drivers.base import ExportClient, ExportRequest, StorageTarget
from qrm_core.errors import AlreadyExists, DriverError, InvalidInput, NotFound
from qrm_nfs import ganesha
from qrm_nfs.driver import NfsStorage

pytestmark = pytest.mark.netns
ADDRESS = "10.231.14.35"
ME = ExportClient(mac="52:54:00:00:00:01", ip=ADDRESS)  # the host itself, as the NFS client
OTHER = ExportClient(mac="52:54:00:00:00:02", ip="10.231.14.36")


@dataclass
class Remote:
    host: Any
    core: Settings
    root: Path
    exports_file: Path
    settings: dict[str, str]

    def storage(self, **extra: str) -> StorageTarget:
        return StorageTarget(name="NFS", type="nfs", address=ADDRESS, settings={**self.settings, **extra})

    @property
    def driver(self) -> NfsStorage:
        return NfsStorage(self.core)

    def on(self, work: Any) -> Any:
        return self.host.netns.inside(work)

    def ls(self, path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.host.netns.name, "nfs-ls", f"nfs://{ADDRESS}{path}/"],
            capture_output=True,
            text=True,
            timeout=30,
        )


@pytest.fixture(scope="module")
def remote_nfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    from qrm_core.remote import install_key, pin_host_key
    from qrm_core.testing import missing
    from qrm_core.testkit import StorageHost, missing_storage_tools

    if os.geteuid() != 0:
        missing("root", "the remote NFS tests run ganesha and sshd in a namespace")
    absent = missing_storage_tools("nsenter", "unshare", "rpcbind", "ganesha.nfsd", "sshd", "ssh")
    if absent:
        missing("remote NFS test components", f"apt-get install {' '.join(absent)}")
    work = tmp_path_factory.mktemp("nfsremote")
    root = work / "exports"
    root.mkdir()
    exports_file = work / "ganesha" / "qrm-exports.conf"
    exports_file.parent.mkdir()
    exports_file.write_text("")
    host = StorageHost("nfsr", work / "host", ADDRESS)
    try:
        pid_file = host.start_ganesha(exports_file)
        user_key, known = host.start_sshd()
        core = Settings(data_dir=work / "qrm")
        install_key(core.data_dir, "NFS", user_key.read_text())
        pin_host_key(core.data_dir, "NFS", ADDRESS, 22, known)
        settings = {
            "ssh_user": "root",
            "export_root": str(root),
            "ganesha_config": str(exports_file),
            "ganesha_pid_file": str(pid_file),
            "ganesha_log_file": str(host.ganesha_log),
        }
        yield Remote(host, core, root, exports_file, settings)
    finally:
        host.stop()


def test_volumes_and_exports_on_a_server_managed_over_ssh(remote_nfs: Remote) -> None:
    r, d, storage = remote_nfs, remote_nfs.driver, remote_nfs.storage()
    r.on(lambda: d.check_server(storage))
    volume = r.on(lambda: d.create_volume(storage, "web", 16))
    assert volume.location == f"{r.root}/web" and (r.root / "web").is_dir()
    (r.root / "web" / "hello.txt").write_text("hi\n")
    with pytest.raises(AlreadyExists):
        r.on(lambda: d.create_volume(storage, "web", 16))
    r.on(lambda: d.validate_location(storage, volume.location))
    assert r.ls(volume.location).returncode != 0  # not exported yet

    reloads = r.host.ganesha_log.read_text(errors="replace").count("Reread exports complete")
    outcomes = r.on(
        lambda: d.export_volumes(
            storage, [ExportRequest(volume.location, ME), ExportRequest(f"{r.root}/nosuch", ME)]
        )
    )
    assert outcomes[0].error is None and isinstance(outcomes[1].error, NotFound)
    assert r.host.ganesha_log.read_text(errors="replace").count("Reread exports complete") == reloads + 1
    listing = r.ls(volume.location)
    assert listing.returncode == 0 and "hello.txt" in listing.stdout, listing
    (export,) = ganesha.parse_exports(r.exports_file.read_text())
    assert export.clients == (ADDRESS,) and export.access == "RW"
    assert [v.exported_to for v in r.on(lambda: d.list_volumes(storage))] == [(ADDRESS,)]
    r.on(lambda: d.export_volume(storage, volume.location, ME))  # idempotent: nothing to do

    r.on(lambda: d.export_volume(storage, volume.location, OTHER))
    assert ganesha.parse_exports(r.exports_file.read_text())[0].access == "RO"  # two machines
    with pytest.raises(DriverError, match="still exported"):
        r.on(lambda: d.remove_volume(storage, volume.location))
    back = r.on(lambda: d.unexport_volumes(storage, [ExportRequest(volume.location, c) for c in (ME, OTHER)]))
    assert [o.error for o in back] == [None, None]
    assert r.ls(volume.location).returncode != 0
    assert ganesha.parse_exports(r.exports_file.read_text()) == []
    r.on(lambda: d.remove_volume(storage, volume.location))
    assert not (r.root / "web").exists()
    with pytest.raises(NotFound):
        r.on(lambda: d.remove_volume(storage, volume.location))


def test_what_the_server_refuses_changes_nothing(remote_nfs: Remote) -> None:
    """ganesha itself refuses the new EXPORT file (the record on the server was damaged by
    hand: two volumes with one Export_Id): the throwaway check on the server says so, and
    the live EXPORT file and the record stay as they were. No running ganesha: refused
    before anything is written."""
    import json

    r, d, storage = remote_nfs, remote_nfs.driver, remote_nfs.storage()
    for name in ("one", "two"):
        r.on(lambda name=name: d.create_volume(storage, name, 1))
    r.on(lambda: d.export_volume(storage, f"{r.root}/one", ME))
    record = r.root / ".qrm-nfs.json"
    state = json.loads(record.read_text())
    state["volumes"][f"{r.root}/two"] = {
        "export_id": state["volumes"][f"{r.root}/one"]["export_id"],
        "clients": [],
    }
    record.write_text(json.dumps(state))
    before = (r.exports_file.read_text(), record.read_text())
    with pytest.raises(DriverError) as caught:
        r.on(lambda: d.export_volume(storage, f"{r.root}/two", ME))
    assert caught.value.message.startswith("ganesha "), caught.value.message
    assert (r.exports_file.read_text(), record.read_text()) == before
    assert r.ls(f"{r.root}/one").returncode == 0  # the live export still works

    stopped = r.storage(ganesha_pid_file=str(r.root / "no.pid"))
    with pytest.raises(
        DriverError, match=r"^cannot export: nfs-ganesha is not running on NFS \(root@10.231.14.35\)"
    ):
        r.on(lambda: d.export_volume(stopped, f"{r.root}/one", OTHER))
    assert (r.exports_file.read_text(), record.read_text()) == before
    state["volumes"].pop(f"{r.root}/two")
    record.write_text(json.dumps(state))
    r.on(lambda: d.unexport_volume(storage, f"{r.root}/one", ME))
    for name in ("one", "two"):
        r.on(lambda name=name: d.remove_volume(storage, f"{r.root}/{name}"))


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"ganesha_pid_file": "/nonexistent/ganesha.pid"}, "nfs-ganesha is not running on NFS (root@10.231.14.35)"),
        ({"export_root": "/nonexistent/exports"}, "NFS storage server NFS (root@10.231.14.35) has no directory /nonexistent/exports"),
        ({"ssh_port": "2222"}, "cannot reach storage server NFS (root@10.231.14.35:2222): nothing listens"),
    ],
)  # fmt: skip
def test_check_server_names_what_is_wrong(remote_nfs: Remote, settings: dict[str, str], says: str) -> None:
    with pytest.raises(DriverError) as caught:
        remote_nfs.on(lambda: remote_nfs.driver.check_server(remote_nfs.storage(**settings)))
    assert caught.value.message.startswith(says) and "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda d, s, r: d.create_volume(s, "a;b", 1), "invalid NFS volume name 'a;b'"),
        (lambda d, s, r: d.validate_location(s, "/etc/passwd"), "NFS location /etc/passwd is not a volume directly under"),
        (lambda d, s, r: d.validate_location(s, f"{r.root}/x y"), "NFS location"),
        (lambda d, s, r: d.validate_server(StorageTarget(name="NFS", type="nfs", address=ADDRESS,
                                                          settings={**s.settings, "export_root": "/x/$(id)"})),
         "nfs storage setting: export_root '/x/$(id)' may only hold"),
        (lambda d, s, r: d.validate_server(StorageTarget(name="NFS", type="nfs", address=ADDRESS,
                                                          settings={**s.settings, "exports": "/x"})),
         "unknown nfs storage setting(s) exports"),
        (lambda d, s, r: d.export_volume(s, f"{r.root}/web", ExportClient(mac="m", ip="10.0.0.1; }")),
         "cannot export"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_changes_nothing(remote_nfs: Remote, call: Any, says: str) -> None:
    r = remote_nfs
    before = (r.exports_file.read_text(), sorted(p.name for p in r.root.iterdir()))
    with pytest.raises(InvalidInput) as caught:
        r.on(lambda: call(r.driver, r.storage(), r))
    assert caught.value.message.startswith(says), caught.value.message
    assert (r.exports_file.read_text(), sorted(p.name for p in r.root.iterdir())) == before
