"""Capturing a running machine into a filesystem image over SSH + rsync (issue 12), against
real sshd and rsync: the machine and a storage server are network namespaces on one
bridge, each with its own sshd; qrm's database stays in the test's namespace.

The storage driver is the fake one, whose volumes' files are real directories (its
open_tree): the NFS and iSCSI drivers are captured into in their own packages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from qrm_core import capture, remote
from qrm_core.errors import AlreadyExists, DriverError, InUse, InvalidInput, NotFound, QrmError
from qrm_core.models import Event, FilesystemImage
from qrm_core.services import images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import missing
from qrm_core.testkit import CaptureLab, make_root_tree, missing_storage_tools

SOURCE_MB = 24


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CaptureLab, Path]]:
    if os.geteuid() != 0:
        missing("root", "the capture tests run sshd in network namespaces")
    absent = missing_storage_tools("nsenter", "unshare", "sshd", "ssh", "ssh-keygen", "rsync")
    if absent:
        missing("OpenSSH and rsync", f"apt-get install {' '.join(absent)}")
    work = tmp_path_factory.mktemp("capture")
    root = make_root_tree(work / "machine-root", data_mb=SOURCE_MB)
    machines = CaptureLab(work)
    try:
        yield machines, root
    finally:
        machines.stop()


@pytest.fixture
def plugins(qrm_plugins: Any, lab: tuple[CaptureLab, Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every storage command (the capture's, the fake driver's) runs in the machines' network."""
    machines, _ = lab

    def runner(settings: Any, storage: Any) -> Any:
        return machines.runner(
            remote.runner_for(settings.data_dir, storage.name, storage.address, storage.settings)
        )

    monkeypatch.setattr(images, "storage_runner", runner)
    monkeypatch.setattr("qrm_core.drivers.fake.storage_runner", runner)
    return qrm_plugins


def ctx_for(settings: Any, plugins: Any) -> Any:
    return service_context(settings, actor="tester", plugins=plugins)


def source_of(machines: CaptureLab, root: Path) -> str:
    return f"root@{machines.source.address}:{root}/"


def add_storage(settings: Any, plugins: Any, machines: CaptureLab, *, over_ssh: bool = False) -> str:
    with ctx_for(settings, plugins) as ctx:
        if not over_ssh:
            storage_service.add_storage(ctx, name="local", type="fake", address="10.0.11.35")
            return "local"
        ssh = storage_service.SshChange(
            user="root",
            key=machines.storage_key.read_text(),
            host_key=machines.storage_known.split(None, 1)[1],
        )
        storage_service.add_storage(ctx, name="san", type="fake", address=machines.storage.address, ssh=ssh)
        return "san"


def tree_of(settings: Any, storage: str, location: str) -> Path:
    return settings.state_dir / "fake-storage" / f"{storage}.trees" / location.strip("/")


def entries(root: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    found = {}
    for entry in sorted(root.rglob("*")):
        st = entry.lstat()
        data: bytes | str = (
            os.readlink(entry) if entry.is_symlink() else entry.read_bytes() if entry.is_file() else b""
        )
        found[str(entry.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, data)
    return found


def expected(root: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """The machine's tree as the image must hold it: pseudo filesystems empty, no SSH
    host keys, the machine-id emptied, dbus's copy gone."""
    want = {
        k: v
        for k, v in entries(root).items()
        if not k.startswith(("proc/", "sys/", "tmp/", "etc/ssh/ssh_host_")) and k != "var/lib/dbus/machine-id"
    }
    mode, uid, gid, _ = want["etc/machine-id"]
    want["etc/machine-id"] = (mode, uid, gid, b"")
    return want


def test_capture_onto_local_storage(qrm_settings: Any, plugins: Any, lab: tuple[CaptureLab, Path]) -> None:
    machines, root = lab
    storage = add_storage(qrm_settings, plugins, machines)
    lines: list[str] = []
    with ctx_for(qrm_settings, plugins) as ctx:
        result = images.capture_filesystem_image(
            ctx,
            name="node1",
            storage=storage,
            source=source_of(machines, root),
            identity=machines.source_key.read_text(),
            excludes=["/var/log/*"],
            progress=lines.append,
            every=0,
        )
    assert (result.origin, result.state, result.progress) == ("captured", "ready", "")
    assert result.source == f"root@{machines.source.address}:{root}/ --exclude=/var/log/*"
    assert result.source_at is not None
    image = tree_of(qrm_settings, storage, result.location)
    want = {k: v for k, v in expected(root).items() if k != "var/log/syslog"}
    assert entries(image) == want
    assert (image / "usr/bin/tool").stat().st_ino == (image / "usr/bin/tool-link").stat().st_ino
    assert os.getxattr(image / "etc/hostname", "user.qrm") == b"yes"
    assert any("MB" in line and "files" in line for line in lines), lines
    # The machine's host key is pinned for next time; the key is in no event.
    pinned = capture.known_hosts_file(qrm_settings.data_dir).read_text()
    assert machines.source_known.split()[2] in pinned
    key = machines.source_key.read_text().strip().splitlines()[1]
    with ctx_for(qrm_settings, plugins) as ctx:
        messages = [e.message for e in ctx.session.exec(select(Event)).all()]
    assert any("captured from" in m and "machine identity reset" in m for m in messages)
    assert not any(key in m for m in messages)


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_capture_runs_on_the_storage_server(
    qrm_settings: Any, plugins: Any, lab: tuple[CaptureLab, Path]
) -> None:
    """With a storage server qrm manages over SSH, rsync runs there: the machine sees the
    storage server log in, and the key went there inside the script only."""
    machines, root = lab
    storage = add_storage(qrm_settings, plugins, machines, over_ssh=True)
    before = machines.source.log("sshd").count(f"from {machines.storage.address}")
    with ctx_for(qrm_settings, plugins) as ctx:
        result = images.capture_filesystem_image(
            ctx, name="node1", storage=storage, source=source_of(machines, root),
            identity=machines.source_key.read_text(),
        )  # fmt: skip
    assert result.state == "ready"
    assert machines.source.log("sshd").count(f"from {machines.storage.address}") > before
    assert entries(tree_of(qrm_settings, storage, result.location)) == expected(root)
    leftovers = [p for p in Path("/tmp").glob("qrm-capture.*")]
    assert not leftovers, leftovers


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_an_interrupted_capture_resumes_to_the_same_result(
    qrm_settings: Any, plugins: Any, lab: tuple[CaptureLab, Path]
) -> None:
    machines, root = lab
    storage = add_storage(qrm_settings, plugins, machines)
    killed: list[int] = []

    def kill_rsync(p: capture.Progress) -> None:
        if p.pid is not None and p.bytes > 2_000_000 and not killed:
            os.kill(p.pid, signal.SIGKILL)  # the rsync, by the PID the job reported
            killed.append(p.pid)

    real = capture.run_capture

    def run_and_kill(*args: Any, **kwargs: Any) -> Any:
        report = kwargs["report"]

        def both(p: capture.Progress) -> None:
            kill_rsync(p)
            report(p)

        return real(*args, **{**kwargs, "report": both, "every": 0})

    key = machines.source_key.read_text()
    patch = pytest.MonkeyPatch()
    patch.setattr(capture, "run_capture", run_and_kill)
    try:
        with ctx_for(qrm_settings, plugins) as ctx, pytest.raises(DriverError, match="interrupted") as info:
            images.capture_filesystem_image(
                ctx, name="cut", storage=storage, source=source_of(machines, root), identity=key, bwlimit=8000
            )
    finally:
        patch.undo()
    assert killed and "filesystem-image capture cut" in str(info.value) and "\n" not in str(info.value)
    with ctx_for(qrm_settings, plugins) as ctx:
        cut = storage_service.show_filesystem_image(ctx, "cut")
    assert cut.state == "error" and "resume with qrm filesystem-image capture cut" in cut.progress
    partial = tree_of(qrm_settings, storage, cut.location)
    assert entries(partial) != expected(root)
    with ctx_for(qrm_settings, plugins) as ctx:
        resumed = images.run_capture(ctx, "cut", identity=key)
    assert (resumed.state, resumed.progress) == ("ready", "")
    with ctx_for(qrm_settings, plugins) as ctx:
        whole = images.capture_filesystem_image(
            ctx, name="whole", storage=storage, source=source_of(machines, root), identity=key
        )
    assert entries(partial) == entries(tree_of(qrm_settings, storage, whole.location)) == expected(root)
    diff = subprocess.run(
        ["diff", "-r", "--no-dereference", str(partial), str(tree_of(qrm_settings, storage, whole.location))],
        capture_output=True,
        text=True,
    )
    assert diff.returncode == 0, diff.stdout


def _state(settings: Any, plugins: Any) -> tuple[list[str], int, dict[str, Any]]:
    with ctx_for(settings, plugins) as ctx:
        names = sorted(ctx.session.exec(select(FilesystemImage.name)).all())
        count = len(ctx.session.exec(select(Event)).all())
    fake = settings.state_dir / "fake-storage" / "local.json"
    return names, count, json.loads(fake.read_text()) if fake.exists() else {}


def test_bad_input_is_one_line_and_nothing_is_made(
    qrm_settings: Any, plugins: Any, lab: tuple[CaptureLab, Path], tmp_path: Path
) -> None:
    machines, root = lab
    storage = add_storage(qrm_settings, plugins, machines)
    key = machines.source_key.read_text()
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    good = source_of(machines, root)
    before = _state(qrm_settings, plugins)
    cases: list[tuple[dict[str, Any], type[QrmError], str]] = [
        ({"source": f"root@{CaptureLab.SUBNET}.9:/"}, DriverError, "cannot log in to root@10.231.20.9:/"),
        ({"identity": other.read_text()}, DriverError, "refused the login"),
        ({"host_key": machines.storage_known.split(None, 1)[1]}, DriverError, "not the one qrm pinned"),
        ({"source": "root@10.0.0.1"}, InvalidInput, "host:/path"),
        ({"source": "root@10.0.0.1:relative"}, InvalidInput, "must be absolute"),
        ({"source": "root@10.0.0.1:/a/../b"}, InvalidInput, "must be absolute"),
        ({"source": "root;reboot@10.0.0.1:/"}, InvalidInput, "not a user name"),
        ({"source": "root@-oProxyCommand=x:/"}, InvalidInput, "not a host name"),
        ({"source": "root@10.0.0.1:/$(reboot)"}, InvalidInput, "must be absolute"),
        ({"excludes": ["a b"]}, InvalidInput, "exclude pattern"),
        ({"excludes": ["x\n--delete"]}, InvalidInput, "exclude pattern"),
        ({"identity": "not a key"}, InvalidInput, "private key"),
        ({"host_key": "nonsense"}, InvalidInput, "TYPE BASE64"),
        ({"size_mb": 0}, InvalidInput, "size"),
        ({"bwlimit": -1}, InvalidInput, "bandwidth"),
        ({"storage": "nosuch"}, NotFound, "storage server"),
        ({"name": "bad name"}, InvalidInput, "name"),
    ]
    for change, error, said in cases:
        options: dict[str, Any] = {"name": "node1", "storage": storage, "source": good, "identity": key}
        options.update(change)
        with ctx_for(qrm_settings, plugins) as ctx, pytest.raises(error) as info:
            images.capture_filesystem_image(ctx, **options)
        assert said in str(info.value) and "\n" not in str(info.value), (change, str(info.value))
        assert key.strip().splitlines()[1] not in str(info.value)
        assert _state(qrm_settings, plugins) == before, change
    # The host key that was refused did not replace the pinned one.
    pins = capture.known_hosts_file(qrm_settings.data_dir)
    assert not pins.exists() or machines.storage_known.split()[2] not in pins.read_text()
    with ctx_for(qrm_settings, plugins) as ctx:
        images.capture_filesystem_image(ctx, name="node1", storage=storage, source=good, identity=key)
    with ctx_for(qrm_settings, plugins) as ctx, pytest.raises(AlreadyExists):
        images.capture_filesystem_image(ctx, name="node1", storage=storage, source=good, identity=key)
    with ctx_for(qrm_settings, plugins) as ctx, pytest.raises(InvalidInput, match="was not captured"):
        storage_service.add_filesystem_image(ctx, name="plain", storage=storage, size_mb=10)
        images.run_capture(ctx, "plain", identity=key)


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_a_capture_in_use_is_refused(qrm_settings: Any, plugins: Any, lab: tuple[CaptureLab, Path]) -> None:
    machines, root = lab
    storage = add_storage(qrm_settings, plugins, machines)
    key = machines.source_key.read_text()
    with ctx_for(qrm_settings, plugins) as ctx:
        images.capture_filesystem_image(
            ctx, name="node1", storage=storage, source=source_of(machines, root), identity=key
        )
    from qrm_core.services import boot_images

    with ctx_for(qrm_settings, plugins) as ctx:
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1.0")
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="node1")
        ves.start_ve(ctx, "web")
    with (
        ctx_for(qrm_settings, plugins) as ctx,
        pytest.raises(InUse, match="virtual environment web is using it"),
    ):
        images.run_capture(ctx, "node1", identity=key)


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_command(
    qrm_settings: Any, qrm_cli: Any, plugins: Any, lab: tuple[CaptureLab, Path], tmp_path: Path
) -> None:
    """openQRM's own form: -s, -l HOST:/ and -t /vhosts/NAME; progress lines on stderr."""
    machines, root = lab
    storage = add_storage(qrm_settings, plugins, machines)
    key = tmp_path / "id"
    key.write_text(machines.source_key.read_text())
    done = qrm_cli(
        "filesystem-image", "create", "-s", storage, "-l", f"{machines.source.address}:{root}",
        "-t", "/vhosts/FC6INSTALL", "--identity", str(key),
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert "captured" in done.stdout and "FC6INSTALL" in done.stdout
    assert "files" in done.stderr  # progress
    (image,) = qrm_cli("filesystem-image", "list", "-o", "json").json()
    assert image["origin"] == "captured" and image["source"].startswith(f"root@{machines.source.address}:")
    bad = qrm_cli(
        "filesystem-image", "create", "-s", storage, "-l", "10.231.20.9:/", "-n", "x", "--identity", str(key)
    )
    assert bad.exit_code != 0 and "cannot log in" in bad.stderr
    assert (
        len([line for line in bad.stderr.splitlines() if line.strip() and "logging in" not in line]) == 1
    ), bad.stderr
    again = qrm_cli("filesystem-image", "capture", "FC6INSTALL", "--identity", str(key))
    assert again.exit_code == 0, again.stderr


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_api_captures_in_the_background(
    qrm_server: Any, plugins: Any, lab: tuple[CaptureLab, Path]
) -> None:
    """POST returns once the login worked and the image exists (202, creating); the copy
    goes on in the server, its progress in the image; the key is in no answer."""
    import time

    machines, root = lab
    key = machines.source_key.read_text()
    with qrm_server.client() as api:
        assert (
            api.post(
                "/api/v1/storage", json={"name": "st", "type": "fake", "address": "10.0.11.35"}
            ).status_code
            == 201
        )
        body = {"name": "node1", "storage": "st", "source": source_of(machines, root), "identity": key}
        started = api.post("/api/v1/filesystem-images/capture", json=body)
        assert started.status_code == 202, started.text
        assert started.json()["state"] == "creating" and "PRIVATE" not in started.text
        deadline = time.monotonic() + 120
        while (shown := api.get("/api/v1/filesystem-images/node1").json())["state"] == "creating":
            assert time.monotonic() < deadline, shown
            time.sleep(0.2)
        assert shown["state"] == "ready" and shown["origin"] == "captured", shown
        refused = api.post(
            "/api/v1/filesystem-images/capture", json={**body, "name": "n2", "source": "root@10.231.20.9:/"}
        )
        assert refused.status_code == 502 and "cannot log in" in refused.json()["error"]["message"]
        assert "PRIVATE" not in refused.text
        assert api.get("/api/v1/filesystem-images/n2").status_code == 404
        events = api.get("/api/v1/events").text
        assert key.strip().splitlines()[1] not in events
        with (
            service_context(qrm_server.settings, plugins=qrm_server.plugins) as ctx,
            images.job_lock(ctx, "node1"),
        ):
            busy = api.post("/api/v1/filesystem-images/node1/capture", json={"identity": key})
        assert busy.status_code == 409 and "another job is working on filesystem image node1" in busy.text
