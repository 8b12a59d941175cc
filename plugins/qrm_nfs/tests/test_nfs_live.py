"""The driver against a real nfs-ganesha 4.3 with real NFS clients (libnfs, showmount).

Each test uses its own volume names; the lab (namespaces, rpcbind, ganesha)
is shared by the module to keep the run short.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from nfslab import CLIENT_IP1, CLIENT_IP2, SERVER_IP1, SERVER_IP2, Lab

from qrm_core.drivers.base import ExportClient
from qrm_core.errors import DriverError, InvalidInput, NotFound
from qrm_nfs import ganesha
from qrm_nfs.driver import STATE_FILE, NfsStorage
from qrm_nfs.settings import NfsSettings

pytestmark = pytest.mark.netns

C1 = ExportClient(mac="52:54:00:00:00:01", ip=CLIENT_IP1)
C2 = ExportClient(mac="52:54:00:00:00:02", ip=CLIENT_IP2)


def _ls(lab: Lab, which: int, path: str, version: int = 3):
    url = lab.url(which, path + "/") + ("?version=4" if version == 4 else "")
    return lab.client(which, "nfs-ls", url)


def test_ganesha_runs_with_its_own_rpcbind(lab: Lab) -> None:
    pid = ganesha.running_pid(lab.nfs.effective_pid_file(lab.core))
    assert pid is not None and lab.service.ganesha is not None and pid == lab.service.ganesha.pid
    programs = lab.in_server("rpcinfo", "-p", "127.0.0.1").stdout
    assert "nfs" in programs and "mountd" in programs and "20048" in programs


def test_export_read_write_refuse_unexport_remove(lab: Lab, tmp_path: Path) -> None:
    d = lab.driver
    volume = d.create_volume(lab.storage, "web", 64)
    path = Path(volume.location)
    assert path == lab.root / "web" and path.is_dir()
    (path / "hello.txt").write_text("hello from the storage server\n")

    started = time.monotonic()
    d.export_volume(lab.storage, volume.location, C1)
    export_seconds = time.monotonic() - started
    print(
        f"export (render + strict parse + throwaway ganesha check + SIGHUP + confirm): {export_seconds:.3f} s"
    )
    assert export_seconds < 5

    # The exported client lists it, reads it and writes into it (NFSv3, as nfsroot does).
    shown = lab.client(1, "showmount", "-e", SERVER_IP1)
    assert volume.location in shown.stdout and CLIENT_IP1 in shown.stdout, shown
    listing = _ls(lab, 1, volume.location)
    assert listing.returncode == 0 and "hello.txt" in listing.stdout, listing
    assert "hello from the storage server" in lab.client(1, "nfs-cat", lab.url(1, f"{path}/hello.txt")).stdout
    local = tmp_path / "from-client.txt"
    local.write_text("written by client 1 over NFS\n")
    copy = lab.client(1, "nfs-cp", str(local), lab.url(1, f"{path}/from-client.txt"))
    assert copy.returncode == 0, copy
    assert (path / "from-client.txt").read_text() == "written by client 1 over NFS\n"
    assert (path / "from-client.txt").stat().st_uid == 0  # root stays root: no root squash
    # NFSv4 sees it at its pseudo path (= its path) too.
    assert "hello.txt" in _ls(lab, 1, volume.location, version=4).stdout

    # The second machine is refused: not even listed to it, and its mount fails.
    refused = _ls(lab, 2, volume.location)
    assert refused.returncode != 0 and "MNT3ERR_ACCES" in refused.stdout + refused.stderr, refused
    assert volume.location not in lab.client(2, "showmount", "-e", SERVER_IP2).stdout

    # Export id is stable and the record is the truth.
    export_id = next(e.export_id for e in ganesha.parse_exports(lab.config.read_text()))
    d.export_volume(lab.storage, volume.location, C1)  # idempotent: no change, no reload
    assert [v.exported_to for v in d.list_volumes(lab.storage) if v.location == volume.location] == [
        (CLIENT_IP1,)
    ]

    # Still exported: removal is refused and nothing is deleted.
    with pytest.raises(DriverError, match="still exported"):
        d.remove_volume(lab.storage, volume.location)
    assert (path / "hello.txt").exists()

    # Export to the second machine too, then withdraw the first: access follows.
    d.export_volume(lab.storage, volume.location, C2)
    assert _ls(lab, 2, volume.location).returncode == 0
    d.unexport_volume(lab.storage, volume.location, C1)
    gone = _ls(lab, 1, volume.location)
    assert gone.returncode != 0, gone
    assert _ls(lab, 2, volume.location).returncode == 0
    assert ganesha.parse_exports(lab.config.read_text())[0].export_id == export_id

    d.unexport_volume(lab.storage, volume.location, C2)
    d.unexport_volume(lab.storage, volume.location, C2)  # idempotent
    assert _ls(lab, 2, volume.location).returncode != 0
    assert ganesha.parse_exports(lab.config.read_text()) == []  # no clients: no EXPORT block
    d.remove_volume(lab.storage, volume.location)
    assert not path.exists()
    with pytest.raises(NotFound):
        d.remove_volume(lab.storage, volume.location)


def test_bad_exports_change_nothing(lab: Lab) -> None:
    d = lab.driver
    volume = d.create_volume(lab.storage, "guarded", 1)
    before = lab.config.read_text() if lab.config.exists() else ""
    for ip in (
        "10.0.0.1; }",
        "10.0.0.1\nEXPORT {",
        "10.0.0.0/8",
        "*",
        "2001:db8::1",
        "0.0.0.0",
        "host.example",
    ):
        with pytest.raises(InvalidInput):
            d.export_volume(lab.storage, volume.location, ExportClient(mac="52:54:00:00:00:09", ip=ip))
    with pytest.raises(InvalidInput):
        d.export_volume(lab.storage, volume.location, ExportClient(mac="52:54:00:00:00:09", ip=None))
    for location in (
        f"{lab.root}/../etc",
        f'{lab.root}/x"; Path = "/',
        f"{lab.root}/x}}",
        "/etc",
        f"{lab.root}/a/b",
        f"{lab.root}/.hidden",
        "relative/path",
    ):
        with pytest.raises(InvalidInput):
            d.export_volume(lab.storage, location, C1)
    # A link out of the export root is not a volume.
    (lab.root / "escape").symlink_to("/etc")
    with pytest.raises(NotFound):
        d.export_volume(lab.storage, str(lab.root / "escape"), C1)
    (lab.root / "escape").unlink()
    with pytest.raises(NotFound):
        d.export_volume(lab.storage, str(lab.root / "missing"), C1)
    assert (lab.config.read_text() if lab.config.exists() else "") == before
    d.remove_volume(lab.storage, volume.location)


def test_ganesha_check_rejects_what_ganesha_rejects(lab: Lab) -> None:
    """The throwaway check reports ganesha's own complaint, and the live
    server's rpcbind registrations survive it (it runs with an empty /run)."""
    good = lab.root / "checked"
    good.mkdir()
    candidate = lab.work / "candidate.conf"
    ok = [ganesha.Export(4000, str(good), (CLIENT_IP1,))]
    candidate.write_text(ganesha.render(ok))
    for _ in range(5):
        assert ganesha.check_with_ganesha(candidate, ok) < 5
    missing_dir = [ganesha.Export(4001, str(lab.root / "nope"), (CLIENT_IP1,))]
    candidate.write_text(ganesha.render(missing_dir))
    with pytest.raises(DriverError, match="Could not create export"):
        ganesha.check_with_ganesha(candidate, missing_dir)
    candidate.write_text(ganesha.render(ok).replace("SecType = sys;", "SecType = sys; Bogus_Key = 1;"))
    with pytest.raises(DriverError, match="Unknown parameter"):
        ganesha.check_with_ganesha(candidate, ok)
    candidate.write_text(ganesha.render(ok)[:-3])
    with pytest.raises(DriverError, match="syntax error"):
        ganesha.check_with_ganesha(candidate, ok)
    duplicate = [*ok, ganesha.Export(4000, str(good), (CLIENT_IP2,))]
    candidate.write_text(ganesha.render(ok) + ganesha.render(duplicate[1:]))
    with pytest.raises(DriverError):
        ganesha.check_with_ganesha(candidate, ok)
    programs = lab.in_server("rpcinfo", "-p", "127.0.0.1").stdout
    assert "nfs" in programs and "mountd" in programs
    assert "qrm-nfs-check" not in Path("/proc/mounts").read_text()
    good.rmdir()


def test_concurrent_exports_serialise(lab: Lab) -> None:
    d = lab.driver
    a = d.create_volume(lab.storage, "pool-a", 1)
    b = d.create_volume(lab.storage, "pool-b", 1)
    errors: list[BaseException] = []

    def export(location: str, client: ExportClient) -> None:
        try:
            NfsStorage(lab.core, lab.nfs).export_volume(lab.storage, location, client)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=export, args=(loc, cl)) for loc in (a.location, b.location) for cl in (C1, C2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    exports = {e.path: e for e in ganesha.parse_exports(lab.config.read_text())}
    assert exports[a.location].clients == exports[b.location].clients == (CLIENT_IP1, CLIENT_IP2)
    assert exports[a.location].export_id != exports[b.location].export_id
    assert _ls(lab, 2, b.location).returncode == 0
    for loc in (a.location, b.location):
        for cl in (C1, C2):
            d.unexport_volume(lab.storage, loc, cl)
        d.remove_volume(lab.storage, loc)


def test_export_needs_a_running_ganesha_and_changes_nothing_without(lab: Lab) -> None:
    stopped = NfsSettings(**{**lab.nfs.model_dump(), "ganesha_pid_file": lab.work / "no-such.pid"})
    d = NfsStorage(lab.core, stopped)
    volume = d.create_volume(lab.storage, "offline", 1)
    before = lab.config.read_text() if lab.config.exists() else ""
    with pytest.raises(DriverError, match="not running"):
        d.export_volume(lab.storage, volume.location, C1)
    assert (lab.config.read_text() if lab.config.exists() else "") == before
    assert [v.exported_to for v in d.list_volumes(lab.storage) if v.location == volume.location] == [()]
    d.remove_volume(lab.storage, volume.location)


def test_service_restart_keeps_exports(lab: Lab) -> None:
    """ganesha started again reads the EXPORT file regenerated from the record."""
    d = lab.driver
    volume = d.create_volume(lab.storage, "survivor", 1)
    d.export_volume(lab.storage, volume.location, C1)
    lab.service.stop()
    assert ganesha.running_pid(lab.nfs.effective_pid_file(lab.core)) is None
    lab.config.write_text("# damaged by hand\n")
    lab.service.start()
    assert _ls(lab, 1, volume.location).returncode == 0
    assert volume.location in lab.config.read_text()
    d.unexport_volume(lab.storage, volume.location, C1)
    d.remove_volume(lab.storage, volume.location)


def test_many_exports_reload(lab: Lab) -> None:
    """200 exported volumes: one regeneration, check and confirmed reload."""
    d = lab.driver
    volumes = [d.create_volume(lab.storage, f"many{i:03d}", 1) for i in range(200)]
    record_file = lab.root / STATE_FILE
    record = json.loads(record_file.read_text())
    for i, volume in enumerate(volumes):
        # Writing the record directly (its format is documented in the README)
        # stands in for 200 export calls, to time one large reload.
        record["volumes"][volume.location]["clients"] = [CLIENT_IP1, f"10.213.9.{i % 250 + 1}"]
    record_file.write_text(json.dumps(record))
    started = time.monotonic()
    d.sync()
    took = time.monotonic() - started
    print(f"200 exports: render + parse + ganesha check + SIGHUP + confirmed reload in {took:.3f} s")
    assert took < 10
    assert len(ganesha.parse_exports(lab.config.read_text())) == 200
    assert _ls(lab, 1, volumes[-1].location).returncode == 0
    assert _ls(lab, 2, volumes[-1].location).returncode != 0
    for volume in volumes:
        record["volumes"][volume.location]["clients"] = []
    record_file.write_text(json.dumps(record))
    d.sync()
    assert ganesha.parse_exports(lab.config.read_text()) == []
    assert _ls(lab, 1, volumes[0].location).returncode != 0
    for volume in volumes:
        d.remove_volume(lab.storage, volume.location)


def test_operator_run_ganesha_without_a_log_file(lab: Lab) -> None:
    """A ganesha qrm does not run: only its PID file is known, so the reload is
    signalled but not confirmed; the export still arrives."""
    external = NfsSettings(
        export_root=lab.root,
        ganesha_config=lab.config,
        ganesha_pid_file=lab.nfs.effective_pid_file(lab.core),
        reload_timeout=15,
    )
    assert external.effective_log_file(lab.core) is None
    d = NfsStorage(lab.core, external)
    volume = d.create_volume(lab.storage, "external", 1)
    d.export_volume(lab.storage, volume.location, C1)
    deadline = time.monotonic() + 10
    while _ls(lab, 1, volume.location).returncode != 0:
        assert time.monotonic() < deadline, "ganesha never applied the export"
        time.sleep(0.1)
    d.unexport_volume(lab.storage, volume.location, C1)
    d.remove_volume(lab.storage, volume.location)


def test_a_batch_is_one_reload_and_two_machines_share_read_only(lab: Lab, tmp_path: Path) -> None:
    """export_volumes: every request in one new EXPORT file (one check, one SIGHUP); a
    request for a missing volume fails alone. A volume exported to two machines is
    read-only for both (never two machines on a writable image), writable again for one."""
    from qrm_core.drivers.base import ExportRequest

    d = lab.driver
    names = [f"batch{i}" for i in range(5)]
    for name in names:
        d.create_volume(lab.storage, name, 1)
    log = lab.nfs.effective_log_file(lab.core)
    assert log is not None
    reloads_before = log.read_text(errors="replace").count("Reread exports complete")
    requests = [ExportRequest(str(lab.root / n), C1) for n in names]
    requests.append(ExportRequest(str(lab.root / "nosuch"), C1))
    outcomes = d.export_volumes(lab.storage, requests)
    assert [o.error for o in outcomes[:5]] == [None] * 5
    assert isinstance(outcomes[5].error, NotFound)
    assert log.read_text(errors="replace").count("Reread exports complete") == reloads_before + 1
    exported = {e.path: e for e in ganesha.parse_exports(lab.config.read_text())}
    assert {str(lab.root / n) for n in names} <= set(exported)
    assert all(exported[str(lab.root / n)].access == "RW" for n in names)

    # A second machine on batch0: read-only for both; the first cannot write any more.
    shared = lab.root / "batch0"
    d.export_volume(lab.storage, str(shared), C2)
    assert ganesha.parse_exports(lab.config.read_text())[0].access == "RO"
    local = tmp_path / "w.txt"
    local.write_text("x\n")
    assert lab.client(1, "nfs-cp", str(local), lab.url(1, f"{shared}/w.txt")).returncode != 0
    assert lab.client(2, "nfs-ls", lab.url(2, f"{shared}/")).returncode == 0
    assert not (shared / "w.txt").exists()
    d.unexport_volume(lab.storage, str(shared), C2)
    assert lab.client(1, "nfs-cp", str(local), lab.url(1, f"{shared}/w.txt")).returncode == 0
    assert (shared / "w.txt").read_text() == "x\n"

    back = d.unexport_volumes(lab.storage, requests[:5])
    assert [o.error for o in back] == [None] * 5
    assert log.read_text(errors="replace").count("Reread exports complete") == reloads_before + 4
    for name in names:
        d.remove_volume(lab.storage, str(lab.root / name))


def test_describe_root_of_a_shared_image_is_read_only_with_an_overlay(lab: Lab) -> None:
    root = lab.driver.describe_root(lab.storage, str(lab.root / "web"), C1, shared=True)
    assert root.kernel_args[-2:] == ("ro", "qrm.overlay=tmpfs") and "rw" not in root.kernel_args
    assert root.kind == "nfs" and not root.secrets
