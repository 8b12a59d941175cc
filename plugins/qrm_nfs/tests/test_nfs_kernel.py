"""``server=kernel``: the exports file qrm owns, applied by the real ``exportfs -ra``.

exportfs runs for real (nfs-utils, package nfs-kernel-server), but never on the
host's files: every call goes through a wrapper that enters a private mount
namespace (``unshare -m``), lays an overlay over /etc (so /etc/exports.d can
exist there without being created on the host) and bind-mounts the test's own
directories over /etc/exports, /etc/exports.d and /var/lib/nfs. What exportfs
accepted is what it wrote to the test's ``etab`` (the table mountd serves).

exportfs parses and checks the files without a kernel nfsd (measured here:
no /proc/fs/nfsd, ``exportfs -ra`` still exits 1 with file, line and reason
for a bad file and writes etab for a good one). Serving a real NFS mount from
the kernel's nfsd is NOT tested: this machine's kernel has no nfsd module, so
everything is tested up to the exports file applied by exportfs.

No QEMU: fast. One test manages the server over real SSH (sshd in a network
namespace of its own, whose sessions find the same exportfs wrapper first on
their PATH).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from qrm_core.config import Settings
from qrm_core.drivers.base import ExportClient, ExportRequest, StorageTarget
from qrm_core.errors import DriverError, InvalidInput
from qrm_core.remote import LocalRunner
from qrm_core.testing import missing
from qrm_nfs import kernel
from qrm_nfs.driver import NfsStorage
from qrm_nfs.ganesha import Export
from qrm_nfs.remote_server import RemoteNfs
from qrm_nfs.settings import NfsSettings

OPTS = "sync,no_subtree_check,no_root_squash"
HEADER = "# Written by qrm (the nfs storage driver, server=kernel). Do not edit: qrm rewrites it.\n"
WRAPPER = """#!/bin/sh
# exportfs on the test's files only: a private mount namespace over the host's.
echo call >> {work}/calls
exec unshare -m --propagation private sh -c '
mount -t overlay qrm-test-etc -o lowerdir=/etc,upperdir={work}/up,workdir={work}/ovl /etc || exit 90
mkdir -p /etc/exports.d || exit 91
mount --bind {work}/exports.d /etc/exports.d && mount --bind {work}/etc-exports /etc/exports \\
  && mount --bind {work}/lib /var/lib/nfs || exit 92
exec {exportfs} "$@"' exportfs "$@"
"""


class Host:
    def __init__(self, work: Path, driver: NfsStorage, storage: StorageTarget) -> None:
        self.work, self.driver, self.storage = work, driver, storage
        self.root = work / "vols"
        self.file = work / "exports.d" / "qrm.exports"

    def calls(self) -> int:
        path = self.work / "calls"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def etab(self) -> list[str]:
        path = self.work / "lib" / "etab"
        return path.read_text().splitlines() if path.exists() else []

    def volume(self, name: str) -> str:
        (self.root / name).mkdir()
        return str(self.root / name)


def _real_exportfs() -> str:
    found = shutil.which("exportfs") or shutil.which("exportfs", path="/usr/sbin:/sbin")
    if found is None:
        missing("exportfs", "install nfs-kernel-server (scripts/system-packages.sh test)")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        missing("a private mount namespace", "run as root with util-linux's unshare")
    assert found is not None
    return found


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    exportfs = _real_exportfs()
    work = tmp_path
    for sub in ("up", "ovl", "exports.d", "lib", "bin", "vols"):
        (work / sub).mkdir()
    (work / "etc-exports").write_text("")
    wrapper = work / "bin" / "exportfs"
    wrapper.write_text(WRAPPER.format(work=work, exportfs=exportfs))
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{work / 'bin'}:{os.environ['PATH']}")
    probe = LocalRunner().script("exportfs -ra; echo rc=$?")
    if "rc=0" not in probe.stdout:
        missing("exportfs in a private mount namespace (overlay on /etc)", probe.stderr.strip()[-200:])
    (work / "calls").unlink()
    core = Settings(data_dir=work / "data")
    driver = NfsStorage(core, NfsSettings(export_root=work / "vols"))
    storage = StorageTarget(
        name="KNFS",
        type="nfs",
        address="10.0.11.35",
        settings={"server": "kernel", "exports_file": str(work / "exports.d" / "qrm.exports")},
    )
    driver.validate_server(storage)
    driver.check_server(storage)
    return Host(work, driver, storage)


def client(ip: str) -> ExportClient:
    return ExportClient(mac="52:54:00:00:00:" + ip.rsplit(".", 1)[1].zfill(2)[-2:], ip=ip)


def test_single_machine_gets_rw_and_exportfs_applies_it(host: Host) -> None:
    web = host.volume("web")
    host.driver.export_volume(host.storage, web, client("10.0.0.5"))
    assert host.file.read_text() == HEADER + f"{web} 10.0.0.5(rw,{OPTS},fsid=1000)\n"
    (line,) = host.etab()
    assert line.startswith(f"{web}\t10.0.0.5(rw,") and "no_root_squash" in line and "fsid=1000" in line
    assert host.calls() == 1
    # Exporting again changes nothing but is confirmed by exportfs (the file is what it applies).
    host.driver.export_volume(host.storage, web, client("10.0.0.5"))
    assert host.file.read_text() == HEADER + f"{web} 10.0.0.5(rw,{OPTS},fsid=1000)\n"


def test_shared_volume_is_ro_for_all_and_fsids_are_stable(host: Host) -> None:
    web, db = host.volume("web"), host.volume("db")
    host.driver.export_volume(host.storage, web, client("10.0.0.5"))
    host.driver.export_volume(host.storage, db, client("10.0.0.9"))
    host.driver.export_volume(host.storage, web, client("10.0.0.6"))
    assert host.file.read_text() == HEADER + (
        f"{db} 10.0.0.9(rw,{OPTS},fsid=1001)\n"
        f"{web} 10.0.0.5(ro,{OPTS},fsid=1000) 10.0.0.6(ro,{OPTS},fsid=1000)\n"
    )
    etab = host.etab()
    assert sorted(line.split("(")[0] for line in etab) == sorted(
        [f"{db}\t10.0.0.9", f"{web}\t10.0.0.5", f"{web}\t10.0.0.6"]
    )
    assert all("(ro," in line for line in etab if line.startswith(web))
    # Back to one machine: read-write again, same fsid.
    host.driver.unexport_volume(host.storage, web, client("10.0.0.6"))
    assert f"{web} 10.0.0.5(rw,{OPTS},fsid=1000)\n" in host.file.read_text()


def test_batches_rewrite_the_file_once(host: Host) -> None:
    vols = [host.volume(f"v{i}") for i in range(4)]
    requests = [ExportRequest(v, client(f"10.0.1.{i + 10}")) for i, v in enumerate(vols)]
    requests.append(ExportRequest(str(host.root / "nonexistent"), client("10.0.1.99")))
    outcomes = host.driver.export_volumes(host.storage, requests)
    assert [o.error is None for o in outcomes] == [True] * 4 + [False]
    assert host.calls() == 1
    assert len(host.file.read_text().splitlines()) == 5 and len(host.etab()) == 4
    outcomes = host.driver.unexport_volumes(host.storage, requests[:4])
    assert all(o.error is None for o in outcomes) and host.calls() == 2
    assert host.file.read_text() == HEADER and host.etab() == []
    assert all(not v.exported_to for v in host.driver.list_volumes(host.storage))


@pytest.mark.parametrize(
    "location",
    ["/x/web (rw)", "web", "/srv/a\n/ *(rw)", "/srv/#a", "/srv/a,b", "/srv/a(b)", '/srv/"a"', "/srv/a b"],
)
def test_injection_through_a_location_is_refused_and_changes_nothing(host: Host, location: str) -> None:
    web = host.volume("web")
    host.driver.export_volume(host.storage, web, client("10.0.0.5"))
    before, calls = host.file.read_text(), host.calls()
    with pytest.raises(InvalidInput) as err:
        host.driver.export_volume(host.storage, str(host.root) + location, client("10.0.0.6"))
    assert "\n" not in str(err.value)
    with pytest.raises(InvalidInput):
        kernel.render([Export(1000, location, ("10.0.0.5",), "RW")])
    assert host.file.read_text() == before and host.calls() == calls


@pytest.mark.parametrize("ip", ["10.0.0.5(rw) *", "*", "10.0.0.0/8", "host.example", "10.0.0.5,rw", "::1"])
def test_injection_through_a_client_is_refused_and_changes_nothing(host: Host, ip: str) -> None:
    web = host.volume("web")
    host.driver.export_volume(host.storage, web, client("10.0.0.5"))
    before, calls = host.file.read_text(), host.calls()
    with pytest.raises(InvalidInput):
        host.driver.export_volume(host.storage, web, ExportClient(mac="52:54:00:00:00:01", ip=ip))
    with pytest.raises(InvalidInput):
        kernel.render([Export(1000, web, (ip,), "RW")])
    assert host.file.read_text() == before and host.calls() == calls


def test_exportfs_refusal_restores_the_previous_file(host: Host) -> None:
    web, db = host.volume("web"), host.volume("db")
    host.driver.export_volume(host.storage, web, client("10.0.0.5"))
    before = host.file.read_text()
    # Someone else's file in /etc/exports.d that exportfs refuses: exportfs -ra applies all of them.
    (host.work / "exports.d" / "admin.exports").write_text(f"{db} 10.0.0.7(rw,bogus)\n")
    with pytest.raises(DriverError) as err:
        host.driver.export_volume(host.storage, db, client("10.0.0.9"))
    message = str(err.value)
    assert "\n" not in message and "refused" in message and 'unknown keyword "bogus"' in message
    assert host.file.read_text() == before
    assert not [p.name for p in (host.work / "exports.d").iterdir() if p.name.startswith("qrm.exports.")]
    # The record did not take the refused change either.
    assert {v.location: v.exported_to for v in host.driver.list_volumes(host.storage)} == {
        db: (),
        web: ("10.0.0.5",),
    }
    (host.work / "exports.d" / "admin.exports").unlink()
    host.driver.export_volume(host.storage, db, client("10.0.0.9"))
    assert f"{db} 10.0.0.9(rw," in host.file.read_text()


def test_exportfs_refusal_of_a_first_file_leaves_no_file(host: Host) -> None:
    web = host.volume("web")
    (host.work / "exports.d" / "admin.exports").write_text(
        "/nonexistent/dir 10.0.0.7(rw,sync,no_subtree_check)\n"
    )
    with pytest.raises(DriverError, match="Failed to stat /nonexistent/dir"):
        host.driver.export_volume(host.storage, web, client("10.0.0.5"))
    assert not host.file.exists()


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"server": "nfsd"}, "server='nfsd': give ganesha or kernel"),
        ({"server": "kernel", "exports_file": "/etc/exports"}, "never writes /etc/exports"),
        ({"server": "kernel", "exports_file": "/etc/exports.d/qrm"}, "ending in .exports"),
        ({"server": "kernel", "exports_file": "/etc/exports.d/a b.exports"}, "may only hold"),
        ({"server": "kernel", "exports_file": "exports.d/qrm.exports"}, "absolute path"),
        ({"server": "kernel", "exports_file": "/etc/exports.d/../exports"}, "may only hold"),
    ],
)
def test_bad_settings_are_one_line(tmp_path: Path, settings: dict[str, str], says: str) -> None:
    driver = NfsStorage(Settings(data_dir=tmp_path), NfsSettings())
    storage = StorageTarget(name="K", type="nfs", address="10.0.11.35", settings=settings)
    with pytest.raises(InvalidInput) as err:
        driver.validate_server(storage)
    assert says in str(err.value) and "\n" not in str(err.value)
    remote = {**settings, "ssh_user": "root"}
    with pytest.raises(InvalidInput):
        driver.validate_server(StorageTarget(name="K", type="nfs", address="10.0.11.35", settings=remote))


def test_storage_add_without_exportfs_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vols").mkdir()
    (tmp_path / "bin").mkdir()
    for tool in ("sh", "base64", "flock", "cat"):
        (tmp_path / "bin" / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    driver = NfsStorage(Settings(data_dir=tmp_path / "data"), NfsSettings(export_root=tmp_path / "vols"))
    settings = {"server": "kernel", "exports_file": str(tmp_path / "qrm.exports")}
    storage = StorageTarget(name="K", type="nfs", address="10.0.11.35", settings=settings)
    with pytest.raises(DriverError) as err:
        driver.check_server(storage)
    assert str(err.value) == "NFS storage on this machine lacks exportfs (package nfs-kernel-server)"
    assert driver.export_readiness(storage) == str(err.value)
    # The same check on a server reached through a runner (over SSH it is ssh ... sh -s).
    remote = RemoteNfs(
        StorageTarget(name="K", type="nfs", address="10.0.11.35", settings=settings), LocalRunner()
    )
    with pytest.raises(DriverError, match=r"lacks exportfs \(install nfs-kernel-server there\)"):
        remote.check()
    # With ganesha (the default), the kernel's tools are not asked for.
    ganesha_storage = StorageTarget(name="G", type="nfs", address="10.0.11.35")
    with pytest.raises(DriverError) as err:
        driver.check_server(ganesha_storage)
    assert "exportfs" not in str(err.value)


def test_a_server_through_its_runner_keeps_its_own_record(host: Host) -> None:
    """The remote path (one locked session: record, exports file, exportfs, record) through a
    local ``sh -s`` instead of ``ssh ... sh -s``; the SSH transport is tested in test_nfs_remote."""
    web = host.volume("web")
    settings = {**host.storage.settings, "export_root": str(host.root)}
    storage = StorageTarget(name="R", type="nfs", address="10.0.11.35", settings=settings)
    server = RemoteNfs(storage, LocalRunner())
    server.check()
    errors = server.batch([ExportRequest(web, client("10.0.0.5"))], [(0, web, "10.0.0.5")], grant=True)
    assert errors == {}
    assert host.file.read_text() == HEADER + f"{web} 10.0.0.5(rw,{OPTS},fsid=1000)\n"
    assert [v.exported_to for v in server.list_volumes()] == [("10.0.0.5",)]
    (host.work / "exports.d" / "admin.exports").write_text(f"{web} 10.0.0.7(rw,bogus)\n")
    with pytest.raises(DriverError, match=r'refused the new exports .*unknown keyword "bogus"'):
        server.batch([ExportRequest(web, client("10.0.0.6"))], [(0, web, "10.0.0.6")], grant=True)
    assert host.file.read_text() == HEADER + f"{web} 10.0.0.5(rw,{OPTS},fsid=1000)\n"
    assert [v.exported_to for v in server.list_volumes()] == [("10.0.0.5",)]


def test_storage_add_as_the_user_runs_it(
    qrm_cli: Any, host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QRM_NFS_EXPORT_ROOT", str(host.root))
    exports_file = f"exports_file={host.file}"

    def add(name: str, *settings: str) -> Any:
        args = ["storage", "add", "-n", name, "-t", "nfs", "-i", "10.0.11.35"]
        return qrm_cli(*args, *[x for s in settings for x in ("-s", s)])

    assert qrm_cli("init").exit_code == 0
    bad = add("BAD", "server=nfsd")
    assert (
        bad.exit_code == 1 and bad.stderr.strip().count("\n") == 0 and "give ganesha or kernel" in bad.stderr
    )
    done = add("KNFS", "server=kernel", exports_file)
    assert done.exit_code == 0, done.stderr
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no exportfs (it lives in /usr/sbin)
    refused = add("NOEXPORTFS", "server=kernel", exports_file)
    assert refused.exit_code == 1 and refused.stderr.strip() == (
        "error: NFS storage on this machine lacks exportfs (package nfs-kernel-server)"
    )
    assert [s["name"] for s in qrm_cli("storage", "list", "-o", "json").json()] == ["KNFS"]


@pytest.mark.netns
def test_a_kernel_server_managed_over_ssh(host: Host, tmp_path: Path) -> None:
    """The same over real SSH: sshd in a namespace of its own, whose sessions find the
    test's exportfs wrapper first on their PATH (``SetEnv``), so the server's exportfs is
    the real one and still never touches the host's files."""
    from qrm_core.remote import install_key, pin_host_key
    from qrm_core.testkit import StorageHost, missing_storage_tools

    absent = missing_storage_tools("sshd", "ssh")
    if absent:
        missing("sshd and ssh", f"apt-get install {' '.join(absent)}")
    address = "10.231.15.35"
    server = StorageHost("knfs", tmp_path / "sshhost", address)
    try:
        path = f"{host.work / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        user_key, known = server.start_sshd(extra_config=f"SetEnv PATH={path}\n")
        core = Settings(data_dir=tmp_path / "qrm")
        install_key(core.data_dir, "KSSH", user_key.read_text())
        pin_host_key(core.data_dir, "KSSH", address, 22, known)
        settings = {**host.storage.settings, "ssh_user": "root", "export_root": str(host.root)}
        storage = StorageTarget(name="KSSH", type="nfs", address=address, settings=settings)
        driver = NfsStorage(core)
        driver.validate_server(storage)
        server.netns.inside(lambda: driver.check_server(storage))
        web, db = host.volume("web"), host.volume("db")
        requests = [ExportRequest(web, client("10.0.0.5")), ExportRequest(db, client("10.0.0.5"))]
        outcomes = server.netns.inside(lambda: driver.export_volumes(storage, requests))
        assert [o.error for o in outcomes] == [None, None] and host.calls() == 1
        server.netns.inside(lambda: driver.export_volume(storage, web, client("10.0.0.6")))
        assert host.file.read_text() == HEADER + (
            f"{db} 10.0.0.5(rw,{OPTS},fsid=1001)\n"
            f"{web} 10.0.0.5(ro,{OPTS},fsid=1000) 10.0.0.6(ro,{OPTS},fsid=1000)\n"
        )
        assert len(host.etab()) == 3
        (host.work / "exports.d" / "admin.exports").write_text(f"{db} 10.0.0.7(rw,bogus)\n")
        with pytest.raises(
            DriverError, match=r"^exportfs on KSSH \(root@10\.231\.15\.35\) refused .*unknown keyword"
        ):
            server.netns.inside(lambda: driver.unexport_volume(storage, db, client("10.0.0.5")))
        assert f"{db} 10.0.0.5(rw," in host.file.read_text()
        (host.work / "exports.d" / "admin.exports").unlink()
        server.netns.inside(lambda: driver.unexport_volumes(storage, requests))
        assert host.file.read_text() == HEADER + f"{web} 10.0.0.6(rw,{OPTS},fsid=1000)\n"
        missing_tool = {**settings, "exports_file": "/nonexistent/dir/qrm.exports"}
        with pytest.raises(DriverError, match="has no directory /nonexistent/dir"):
            target = StorageTarget(name="KSSH", type="nfs", address=address, settings=missing_tool)
            server.netns.inside(lambda: driver.check_server(target))
    finally:
        server.stop()


def test_a_refused_file_of_its_own_is_replaced_and_the_table_restored(host: Host) -> None:
    """Measured: when qrm's own file has a syntax error, ``exportfs -ra`` exits 1 and leaves
    etab EMPTY (every export withdrawn). The script puts the previous file back and applies it
    again, so the table is what it was. (The driver never renders such a file: this feeds the
    script a hand-made one.)"""
    web = host.volume("web")
    host.driver.export_volume(host.storage, web, client("10.0.0.5"))
    before, etab = host.file.read_text(), host.etab()
    assert len(etab) == 1
    bad = HEADER + f"{web} 10.0.0.5(rw,bogus)\n"
    done = LocalRunner().script(kernel.apply_script(str(host.file), bad))
    with pytest.raises(
        DriverError, match=r'refused the new exports .*qrm\.exports:[0-9]+: unknown keyword "bogus"$'
    ):
        kernel.outcome(done.stdout, done.stderr, "this machine")
    assert host.file.read_text() == before and host.etab() == etab
    # Without the re-apply the table would be empty: exportfs alone on the bad file.
    host.file.write_text(bad)
    assert LocalRunner().script("exportfs -ra").returncode == 1 and host.etab() == []
