"""Clones, snapshots, reverts and ``qrm ve reset`` through the services, the API and the
CLI, on SQLite, PostgreSQL and MariaDB, with the fake storage driver (its bookkeeping;
the NFS and iSCSI drivers' data is tested in their packages): every rule refused in one
line with nothing changed, no driver call inside a database transaction."""

from __future__ import annotations

import html
import re
import time
from typing import Any

import pytest
from sqlmodel import select

from qrm_core.errors import (
    AlreadyExists,
    DriverError,
    InUse,
    InvalidInput,
    NotFound,
    QrmError,
    UnsupportedOperation,
)
from qrm_core.models import Event, FilesystemImage, VirtualEnvironment
from qrm_core.plugins import STORAGE_GROUP
from qrm_core.services import boot_images, images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.services import virtual_environments as ves


def ctx_for(settings: Any, plugins: Any) -> Any:
    return service_context(settings, actor="tester", plugins=plugins)


@pytest.fixture
def site(qrm_settings: Any, qrm_plugins: Any) -> tuple[Any, Any]:
    with ctx_for(qrm_settings, qrm_plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
        storage_service.add_filesystem_image(ctx, name="web", storage="st", size_mb=100)
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1.0")
    return qrm_settings, qrm_plugins


def snapshot_of(settings: Any, plugins: Any) -> tuple[Any, ...]:
    """Everything a refused operation must leave as it was."""
    with ctx_for(settings, plugins) as ctx:
        rows = ctx.session.exec(select(FilesystemImage).order_by(FilesystemImage.name)).all()
        fs = [(r.name, r.location, r.state, r.source, r.progress) for r in rows]
        ve_rows = [(v.name, v.state, v.desired_state) for v in ctx.session.exec(select(VirtualEnvironment))]
        count = len(ctx.session.exec(select(Event)).all())
    fake = settings.state_dir / "fake-storage" / "st.json"
    return tuple(fs), tuple(ve_rows), count, fake.read_text()


def test_snapshot_list_revert_remove_and_clone(site: tuple[Any, Any]) -> None:
    settings, plugins = site
    with ctx_for(settings, plugins) as ctx:
        taken = images.snapshot_filesystem_image(ctx, "web", label="clean")
        assert (taken.image, taken.label) == ("web", "clean")
        auto = images.snapshot_filesystem_image(ctx, "web")
        assert auto.label.endswith("Z")
        assert [s.label for s in images.list_image_snapshots(ctx, "web")] == ["clean", auto.label]
        assert images.revert_filesystem_image(ctx, "web", label="clean").label == "clean"
        images.remove_image_snapshot(ctx, "web", auto.label)
        assert [s.label for s in images.list_image_snapshots(ctx, "web")] == ["clean"]
        clone = images.clone_filesystem_image(ctx, "web", name="web2", comment="copy")
        assert (clone.storage, clone.state, clone.source, clone.size_mb) == (
            "st",
            "ready",
            "clone of web",
            100,
        )
        messages = [e.message for e in ctx.session.exec(select(Event).order_by(Event.id)).all()]
    assert any("snapshot clean taken" in m for m in messages)
    assert any("reverted to clean" in m for m in messages)
    assert any("web2 cloned from web" in m for m in messages)


def test_bad_input_is_one_line_and_changes_nothing(site: tuple[Any, Any]) -> None:
    settings, plugins = site
    with ctx_for(settings, plugins) as ctx:
        images.snapshot_filesystem_image(ctx, "web", label="clean")
        storage_service.add_storage(ctx, name="other", type="fake", address="10.0.11.36")
    before = snapshot_of(settings, plugins)
    cases: list[tuple[Any, type[QrmError], str]] = [
        (lambda c: images.snapshot_filesystem_image(c, "web", label="../x"), InvalidInput, "snapshot label"),
        (lambda c: images.snapshot_filesystem_image(c, "web", label="a b"), InvalidInput, "snapshot label"),
        (lambda c: images.snapshot_filesystem_image(c, "nosuch"), NotFound, "does not exist"),
        (lambda c: images.snapshot_filesystem_image(c, "web", label="clean"), QrmError, "already has"),
        (lambda c: images.revert_filesystem_image(c, "web", label="nosuch"), NotFound, "no snapshot"),
        (lambda c: images.revert_filesystem_image(c, "web", label="-rf"), InvalidInput, "snapshot label"),
        (lambda c: images.remove_image_snapshot(c, "web", "nosuch"), NotFound, "no snapshot"),
        (lambda c: images.clone_filesystem_image(c, "web", name="web"), AlreadyExists, "already exists"),
        (lambda c: images.clone_filesystem_image(c, "web", name="bad name"), InvalidInput, "name"),
        (lambda c: images.clone_filesystem_image(c, "nosuch", name="x"), NotFound, "does not exist"),
        (
            lambda c: images.clone_filesystem_image(c, "web", name="web", storage="other"),
            AlreadyExists,
            "already exists",
        ),
        (lambda c: images.clone_filesystem_image(c, "web", name="x", storage="nosuch"), NotFound, "storage"),
        (lambda c: images.reset_ve(c, "nosuch"), NotFound, "does not exist"),
    ]
    for call, error, said in cases:
        with ctx_for(settings, plugins) as ctx, pytest.raises(error) as info:
            call(ctx)
        assert said in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert snapshot_of(settings, plugins) == before, said


def test_an_image_in_use_cannot_be_reverted_or_cloned(site: tuple[Any, Any]) -> None:
    settings, plugins = site
    with ctx_for(settings, plugins) as ctx:
        images.snapshot_filesystem_image(ctx, "web", label="clean")
        ves.create_ve(ctx, name="team", boot_image="idle", fs_image="web")
        ves.start_ve(ctx, "team")
    before = snapshot_of(settings, plugins)
    with ctx_for(settings, plugins) as ctx, pytest.raises(InUse) as info:
        images.revert_filesystem_image(ctx, "web", label="clean")
    assert str(info.value) == (
        "cannot revert filesystem image web: virtual environment team is using it (stop it first)"
    )
    with ctx_for(settings, plugins) as ctx, pytest.raises(InUse, match="team"):
        images.clone_filesystem_image(ctx, "web", name="copy")
    assert snapshot_of(settings, plugins) == before
    with ctx_for(settings, plugins) as ctx:
        ves.stop_ve(ctx, "team")  # no members: stopped at once
        images.revert_filesystem_image(ctx, "web", label="clean")


def test_reset_gives_a_pristine_ve_its_first_start_back(site: tuple[Any, Any]) -> None:
    settings, plugins = site
    with ctx_for(settings, plugins) as ctx:
        created = ves.create_ve(ctx, name="team", boot_image="idle", fs_image="web", pristine=True)
        assert created.pristine
        with pytest.raises(InvalidInput, match="has not started yet"):
            images.reset_ve(ctx, "team")
        ves.start_ve(ctx, "team")
        assert [s.label for s in images.list_image_snapshots(ctx, "web")] == [images.PRISTINE_LABEL]
        ves.stop_ve(ctx, "team")
        ves.start_ve(ctx, "team")  # a second start keeps the first start's snapshot
        assert [s.label for s in images.list_image_snapshots(ctx, "web")] == [images.PRISTINE_LABEL]
        lines: list[str] = []
        result = images.reset_ve(ctx, "team", progress=lines.append, poll=0.05)
        assert result.desired_state == "running" and result.state == "starting"
        assert lines[0].startswith("team: its machines reboot") and any(
            "reverting web" in line for line in lines
        )
        with pytest.raises(InUse, match="what virtual environment team resets to"):
            images.remove_image_snapshot(ctx, "web", images.PRISTINE_LABEL)
        ves.stop_ve(ctx, "team")
        stopped = images.reset_ve(ctx, "team")
        assert stopped.desired_state == "stopped"  # a stopped VE stays stopped, reverted
        ves.create_ve(ctx, name="plain", boot_image="idle", fs_image="web")
        with pytest.raises(InvalidInput, match="not kept pristine"):
            images.reset_ve(ctx, "plain")
        messages = [e.message for e in ctx.session.exec(select(Event).order_by(Event.id)).all()]
    assert sum("reverted to its first start" in m for m in messages) == 2


@pytest.mark.qrm_backends("sqlite")  # the reset is the services'; this checks a remote CLI shows it meanwhile
def test_a_remote_reset_shows_the_ve_while_the_server_works(
    qrm_server: Any, qrm_cli: Any, monkeypatch: Any
) -> None:
    from qrm_core.drivers.fake import FakeStorage

    settings, plugins = qrm_server.settings, qrm_server.plugins
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
        storage_service.add_filesystem_image(ctx, name="web", storage="st", size_mb=100)
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1.0")
        ves.create_ve(ctx, name="team", boot_image="idle", fs_image="web", pristine=True)
        ves.start_ve(ctx, "team")
    real = FakeStorage.revert_volume

    def slow_revert(self: Any, *args: Any, **kwargs: Any) -> str:
        time.sleep(1.5)  # the CLI asks every 0.5 s
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FakeStorage, "revert_volume", slow_revert)
    server = ["--server", qrm_server.url, "-u", "qrm", "-p", "qrm"]
    done = qrm_cli(*server, "ve", "reset", "team")
    assert done.exit_code == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "resetting team on the server"
    assert "team: starting (resetting: reverting its image)" in lines, lines
    assert "virtual environment team reset (starting)" in done.stdout


def test_pristine_needs_storage_with_snapshots(site: tuple[Any, Any]) -> None:
    from qrm_core.drivers.fake import FakeStorage

    class NoSnapshots(FakeStorage):
        name = "nosnap"

        def supported_operations(self, target: object | None = None) -> frozenset[str]:
            return super().supported_operations(target) - {"snapshot_volume", "revert_volume"}

    settings, plugins = site
    plugins.add_driver(STORAGE_GROUP, NoSnapshots(settings))
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_storage(ctx, name="plain", type="nosnap", address="10.0.11.37")
        storage_service.add_filesystem_image(ctx, name="flat", storage="plain", size_mb=10)
    before = snapshot_of(settings, plugins)
    with ctx_for(settings, plugins) as ctx, pytest.raises(UnsupportedOperation) as info:
        ves.create_ve(ctx, name="team", boot_image="idle", fs_image="flat", pristine=True)
    assert str(info.value) == "nosnap on plain cannot snapshot volumes"
    with ctx_for(settings, plugins) as ctx, pytest.raises(UnsupportedOperation):
        images.snapshot_filesystem_image(ctx, "flat")
    assert snapshot_of(settings, plugins) == before


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_commands_and_the_api(qrm_server: Any, qrm_cli: Any) -> None:
    with qrm_server.client() as api:
        assert (
            api.post(
                "/api/v1/storage", json={"name": "st", "type": "fake", "address": "10.0.11.35"}
            ).status_code
            == 201
        )
        made = api.post("/api/v1/filesystem-images", json={"name": "web", "storage": "st", "size_mb": 100})
        assert made.status_code == 201, made.text
        snap = api.post("/api/v1/filesystem-images/web/snapshots", json={"label": "clean"})
        assert snap.status_code == 201 and snap.json()["label"] == "clean"
        listed = api.get("/api/v1/filesystem-images/web/snapshots").json()
        assert [s["label"] for s in listed] == ["clean"]
        bad = api.post("/api/v1/filesystem-images/web/snapshots", json={"label": "a;b"})
        assert bad.status_code == 422 and "snapshot label" in bad.json()["error"]["message"]
        assert api.post("/api/v1/filesystem-images/web/revert", json={"label": "clean"}).status_code == 200
        missing = api.post("/api/v1/filesystem-images/web/revert", json={"label": "nosuch"})
        assert missing.status_code == 404
        clone = api.post("/api/v1/filesystem-images/web/clone", json={"name": "web2"})
        assert clone.status_code == 201 and clone.json()["source"] == "clone of web"
        gone = api.delete("/api/v1/filesystem-images/web/snapshots/clean")
        assert gone.status_code == 200
    server = ["--server", qrm_server.url, "-u", "qrm", "-p", "qrm"]
    for args, said in (
        (["filesystem-image", "snapshot", "web", "--label", "s1"], "snapshot s1 of web taken"),
        (["filesystem-image", "snapshots", "web"], "s1"),
        (["filesystem-image", "revert", "web", "--to", "s1"], "reverted web to s1"),
        (["filesystem-image", "snapshot-remove", "web", "s1"], "removed snapshot s1 of web"),
        (["filesystem-image", "clone", "web", "-n", "web3"], "cloned web into filesystem image web3"),
    ):
        done = qrm_cli(*server, *args)
        assert done.exit_code == 0 and said in done.stdout, (args, done.stdout, done.stderr)
    refused = qrm_cli(*server, "filesystem-image", "revert", "web", "--to", "nosuch")
    assert refused.exit_code != 0 and len(refused.stderr.strip().splitlines()) == 1


READ_WRITE_REFUSAL = (
    "virtual environment second cannot start: filesystem image web is exported read-write to "
    "virtual environment team, which is starting (stop team first)"
)


def test_an_image_exported_read_write_is_not_given_to_a_second_ve(site: tuple[Any, Any]) -> None:
    """Two VEs on one image: refused while either would write it; two shared (read-only) ones may."""
    settings, plugins = site
    with ctx_for(settings, plugins) as ctx:
        ves.create_ve(ctx, name="team", boot_image="idle", fs_image="web")
        ves.create_ve(ctx, name="second", boot_image="idle", fs_image="web")
        ves.create_ve(ctx, name="pool", boot_image="idle", fs_image="web", deployment="shared")
        ves.create_ve(ctx, name="pool2", boot_image="idle", fs_image="web", deployment="shared")
        ves.start_ve(ctx, "team")
    before = snapshot_of(settings, plugins)
    with ctx_for(settings, plugins) as ctx, pytest.raises(InUse) as info:
        ves.start_ve(ctx, "second")
    assert str(info.value) == READ_WRITE_REFUSAL
    with (
        ctx_for(settings, plugins) as ctx,
        pytest.raises(InUse, match="read-write to virtual environment team"),
    ):
        ves.start_ve(ctx, "pool")  # read-only beside a writer is no better
    assert snapshot_of(settings, plugins) == before
    with ctx_for(settings, plugins) as ctx:
        assert ves.start_ve(ctx, "team").desired_state == "running"  # asking again is no second VE
        ves.stop_ve(ctx, "team")  # no members: stopped at once
        ves.start_ve(ctx, "pool")
        ves.start_ve(ctx, "pool2")  # both read-only, with overlays
    before = snapshot_of(settings, plugins)
    with ctx_for(settings, plugins) as ctx, pytest.raises(InUse) as info:
        ves.start_ve(ctx, "second")
    assert str(info.value) == (
        "virtual environment second cannot start: it would mount filesystem image web read-write "
        "while virtual environment pool (starting) shares it read-only (stop pool first)"
    )
    assert snapshot_of(settings, plugins) == before
    with ctx_for(settings, plugins) as ctx:
        ves.stop_ve(ctx, "pool")
        ves.stop_ve(ctx, "pool2")
        assert ves.start_ve(ctx, "second").desired_state == "running"


def test_images_each_machine_copies_are_shared_freely(site: tuple[Any, Any]) -> None:
    """A storage type that gives each machine a copy of its own (a RAM root,
    as qrm-ramdisk's): two VEs may use one image, whatever their deployment."""
    from qrm_core.drivers.fake import FakeStorage

    class Copies(FakeStorage):
        name = "copies"
        copies_per_machine = True

    settings, plugins = site
    plugins.add_driver(STORAGE_GROUP, Copies(settings))
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_storage(ctx, name="ram", type="copies", address="10.0.11.38")
        storage_service.add_filesystem_image(ctx, name="root", storage="ram", size_mb=10)
        for name, deployment in (("one", "single"), ("two", "single"), ("three", "shared")):
            ves.create_ve(ctx, name=name, boot_image="idle", fs_image="root", deployment=deployment)
            assert ves.start_ve(ctx, name).desired_state == "running"


@pytest.mark.qrm_backends("sqlite")  # the rule is the services'; this checks the three clients say it alike
def test_the_read_write_refusal_reads_the_same_everywhere(qrm_server: Any, qrm_cli: Any) -> None:
    import httpx

    with ctx_for(qrm_server.settings, qrm_server.plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
        storage_service.add_filesystem_image(ctx, name="web", storage="st", size_mb=100)
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1.0")
        ves.create_ve(ctx, name="team", boot_image="idle", fs_image="web")
        ves.create_ve(ctx, name="second", boot_image="idle", fs_image="web")
    with qrm_server.client() as api:
        assert api.post("/api/v1/ves/team/start").status_code == 200
        refused = api.post("/api/v1/ves/second/start")
        assert refused.status_code == 409 and refused.json()["error"]["message"] == READ_WRITE_REFUSAL
    server = ["--server", qrm_server.url, "-u", "qrm", "-p", "qrm"]
    done = qrm_cli(*server, "ve", "start", "second")
    assert done.exit_code != 0 and done.stderr.strip().splitlines()[-1].endswith(READ_WRITE_REFUSAL), (
        done.stderr
    )
    assert len(done.stderr.strip().splitlines()) == 1
    with httpx.Client(base_url=qrm_server.url, headers={"accept": "text/html"}, timeout=30) as web:
        form = web.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token
        web.post("/login", data={"user": "qrm", "password": "qrm", "csrf_token": token.group(1)})
        page = web.get("/ves/second")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token
        shown = web.post("/ves/second/start", data={"csrf_token": token.group(1)}, follow_redirects=True)
        assert READ_WRITE_REFUSAL in html.unescape(shown.text), shown.text[:2000]
    with qrm_server.client() as api:
        assert api.get("/api/v1/ves/second").json()["desired_state"] == "stopped"


def test_clone_onto_another_storage_server_copies_the_files(site: tuple[Any, Any]) -> None:
    """Two fake storage servers (their volumes are real directories here): the files go
    over as a tar stream, owners, modes and links kept; a failure leaves nothing."""
    import os

    from qrm_core.drivers.fake import FakeStorage

    settings, plugins = site
    trees = settings.state_dir / "fake-storage"
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_storage(ctx, name="other", type="fake", address="10.0.11.36")
        location = storage_service.show_filesystem_image(ctx, "web").location
    source = trees / "st.trees" / location.strip("/")
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "hostname").write_text("web1\n")
    (source / "big").write_bytes(os.urandom(3 << 20))
    os.link(source / "big", source / "big-link")
    (source / "etc" / "link").symlink_to("../big")
    (source / "secret").write_text("s")
    (source / "secret").chmod(0o600)
    if os.geteuid() == 0:
        os.chown(source / "secret", 1234, 2345)
    lines: list[str] = []
    with ctx_for(settings, plugins) as ctx:
        made = images.clone_filesystem_image(ctx, "web", name="web2", storage="other", progress=lines.append)
        messages = [e.message for e in ctx.session.exec(select(Event).order_by(Event.id)).all()]
    assert (made.storage, made.state, made.source, made.size_mb) == ("other", "ready", "clone of web", 100)
    copy = trees / "other.trees" / made.location.strip("/")
    for path in ("etc/hostname", "big", "secret"):
        assert (copy / path).read_bytes() == (source / path).read_bytes()
    assert os.readlink(copy / "etc" / "link") == "../big"
    assert (copy / "big").stat().st_ino == (copy / "big-link").stat().st_ino  # a hard link stays one
    secret = (copy / "secret").stat()
    assert secret.st_mode & 0o777 == 0o600
    if os.geteuid() == 0:
        assert (secret.st_uid, secret.st_gid) == (1234, 2345)
    assert (
        lines[0] == "making a 100 MB volume on other"
        and lines[-1] == "making the image from the copied files"
    )
    pattern = r"copying web to other: 3\.\d MB of 3\.\d MB \(\d+%\), [\d.]+ [KMG]?B/s.*"
    assert any(re.fullmatch(pattern, line) for line in lines), lines
    assert re.fullmatch(r"copied 3\.\d MB in \d+ s", lines[-2]), lines
    assert any("web2 cloned from web on st" in m and "through this machine" in m for m in messages)

    class FailsToClose(FakeStorage):
        name = "fails"

        def close_tree(self, storage: Any, location: str, tree: str) -> str:
            raise QrmError("the server's disk is full")

    class CannotFill(FakeStorage):
        name = "nofill"

        def supported_operations(self, target: object | None = None) -> frozenset[str]:
            return super().supported_operations(target) - {"open_tree", "close_tree"}

    plugins.add_driver(STORAGE_GROUP, FailsToClose(settings))
    plugins.add_driver(STORAGE_GROUP, CannotFill(settings))
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_storage(ctx, name="full", type="fails", address="10.0.11.37")
        storage_service.add_storage(ctx, name="flat", type="nofill", address="10.0.11.38")
    before = snapshot_of(settings, plugins)
    full_state = trees / "full.json"
    with ctx_for(settings, plugins) as ctx, pytest.raises(QrmError) as info:
        images.clone_filesystem_image(ctx, "web", name="web3", storage="full")
    assert str(info.value) == "the server's disk is full"
    after = snapshot_of(settings, plugins)
    # Nothing kept but the two events that say what happened.
    assert (after[0], after[1], after[3]) == (before[0], before[1], before[3]) and after[2] == before[2] + 2
    with ctx_for(settings, plugins) as ctx:
        said = [e.message for e in ctx.session.exec(select(Event).order_by(Event.id)).all()][-2:]
    assert said[0].startswith("filesystem image web3: clone of web from st started (100 MB on full:")
    assert said[1] == "filesystem image web3: clone of web failed, nothing kept: the server's disk is full"
    assert '"/volumes/web3"' not in full_state.read_text()  # the volume made for it went again
    before = snapshot_of(settings, plugins)
    with ctx_for(settings, plugins) as ctx, pytest.raises(UnsupportedOperation) as info:
        images.clone_filesystem_image(ctx, "web", name="web3", storage="flat")
    assert str(info.value) == "nofill on flat cannot fill volumes with files"
    assert snapshot_of(settings, plugins) == before


@pytest.mark.qrm_backends("sqlite")  # the progress is the services'; this checks clients see it meanwhile
def test_a_clone_across_shows_its_progress_while_it_copies(
    qrm_server: Any, qrm_cli: Any, monkeypatch: Any
) -> None:
    """The new image exists while the files go over (state creating, its progress on the
    row): the API's show and list say so, and a remote ``qrm filesystem-image clone -s``
    shows the lines as the server copies, not only at the end."""
    import threading

    import httpx

    from qrm_core import remote

    settings, plugins = qrm_server.settings, qrm_server.plugins
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
        storage_service.add_storage(ctx, name="other", type="fake", address="10.0.11.36")
        location = storage_service.add_filesystem_image(ctx, name="web", storage="st", size_mb=100).location
    source = settings.state_dir / "fake-storage" / "st.trees" / location.strip("/")
    source.mkdir(parents=True)
    (source / "hello").write_text("hi\n")
    copying, seen = threading.Event(), threading.Event()
    real = remote.copy_tree

    def slow_copy(*args: Any, report: Any = None, **kwargs: Any) -> int:
        """The copy reports, then waits until the test has seen the image mid-copy."""
        report(1 << 20, 1.0)
        copying.set()
        assert seen.wait(30), "nobody looked at the image while it was copied"
        return real(*args, report=report, **kwargs)

    monkeypatch.setattr(remote, "copy_tree", slow_copy)
    shown: dict[str, Any] = {}

    def look() -> None:
        assert copying.wait(30)
        with httpx.Client(base_url=qrm_server.url, auth=("qrm", "qrm"), timeout=30) as api:
            shown["show"] = api.get("/api/v1/filesystem-images/web2").json()
            shown["list"] = [i["name"] for i in api.get("/api/v1/filesystem-images").json()]
        time.sleep(1.5)  # the CLI asks every 0.5 s
        seen.set()

    watcher = threading.Thread(target=look)
    watcher.start()
    server = ["--server", qrm_server.url, "-u", "qrm", "-p", "qrm"]
    done = qrm_cli(*server, "filesystem-image", "clone", "web", "-n", "web2", "-s", "other")
    watcher.join()
    assert done.exit_code == 0, done.stderr
    assert (shown["show"]["state"], shown["show"]["storage"]) == ("creating", "other"), shown
    assert shown["show"]["progress"].startswith("cloning: copying web to other: 1.0 MB"), shown
    assert shown["list"] == ["web", "web2"]
    lines = done.stderr.splitlines()
    assert any(line.startswith("copying web to other: 1.0 MB") for line in lines), lines
    assert "cloned web into filesystem image web2 (other:/volumes/web2)" in done.stdout
    with ctx_for(settings, plugins) as ctx:
        made = storage_service.show_filesystem_image(ctx, "web2")
    assert (made.state, made.progress) == ("ready", "")


def test_a_clone_across_releases_the_tree_it_read(site: tuple[Any, Any]) -> None:
    """release_tree follows every read_tree that returned, once, with the tree it gave and no
    transaction open: after a copy that worked and after one that failed (the copy's error is
    the one told). A release that fails after a good copy keeps the clone, with a warning."""
    from qrm_core.drivers.fake import FakeStorage
    from qrm_core.models import EventLevel

    settings, plugins = site
    calls: list[tuple[str, str, str, bool]] = []
    now: dict[str, Any] = {"refuse": False}

    class Releasing(FakeStorage):
        name = "releasing"

        def read_tree(self, storage: Any, location: str) -> str:
            tree = super().read_tree(storage, location)
            calls.append(("read", location, tree, now["ctx"].session.in_transaction()))
            return tree

        def release_tree(self, storage: Any, location: str, tree: str) -> None:
            calls.append(("release", location, tree, now["ctx"].session.in_transaction()))
            if now["refuse"]:
                raise DriverError("umount: target is busy")

    class FailsToClose(FakeStorage):
        name = "fails"

        def close_tree(self, storage: Any, location: str, tree: str) -> str:
            raise QrmError("the server's disk is full")

    class NoRoom(FakeStorage):
        name = "noroom"

        def create_volume(self, storage: Any, name: str, size_mb: int) -> Any:
            raise DriverError("no room for 50 MB")

    for driver in (Releasing, FailsToClose, NoRoom):
        plugins.add_driver(STORAGE_GROUP, driver(settings))
    with ctx_for(settings, plugins) as ctx:
        for name, kind in (("src", "releasing"), ("other", "fake"), ("full", "fails"), ("tiny", "noroom")):
            storage_service.add_storage(ctx, name=name, type=kind, address="10.0.11.40")
        storage_service.add_filesystem_image(ctx, name="db", storage="src", size_mb=50)
        location = storage_service.show_filesystem_image(ctx, "db").location
    tree = settings.state_dir / "fake-storage" / "src.trees" / location.strip("/")
    tree.mkdir(parents=True)
    (tree / "data").write_text("rows\n")
    read_then_released = [("read", location, str(tree), False), ("release", location, str(tree), False)]

    def clone(new: str, onto: str) -> Any:
        calls.clear()
        with ctx_for(settings, plugins) as ctx:
            now["ctx"] = ctx
            return images.clone_filesystem_image(ctx, "db", name=new, storage=onto)

    made = clone("db2", "other")
    assert calls == read_then_released
    copy = settings.state_dir / "fake-storage" / "other.trees" / made.location.strip("/") / "data"
    assert copy.read_text() == "rows\n"
    for onto, error in (("full", "the server's disk is full"), ("tiny", "no room for 50 MB")):
        with pytest.raises(QrmError) as info:
            clone("db3", onto)
        assert str(info.value) == error
        assert calls == read_then_released, onto
    now["refuse"] = True
    with pytest.raises(QrmError) as info:
        clone("db3", "full")
    assert str(info.value) == "the server's disk is full"  # not the release's
    assert calls == read_then_released
    assert clone("db4", "other").state == "ready"  # the copy worked: the clone stays
    assert calls == read_then_released
    with ctx_for(settings, plugins) as ctx:
        warnings = ctx.session.exec(select(Event).where(Event.level == EventLevel.WARNING.value)).all()
        assert [(e.object_name, e.message) for e in warnings] == [
            ("db", f"the files of volume {location} on src read for a clone were not released: "
             "umount: target is busy")
        ]  # fmt: skip
        assert [i.name for i in storage_service.list_filesystem_images(ctx)] == ["db", "db2", "db4", "web"]


@pytest.mark.qrm_backends("sqlite")  # the copy is the services'; this checks the command shows it
def test_the_clone_command_shows_its_progress(site: tuple[Any, Any], qrm_cli: Any) -> None:
    settings, plugins = site
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_storage(ctx, name="other", type="fake", address="10.0.11.36")
        location = storage_service.show_filesystem_image(ctx, "web").location
    source = settings.state_dir / "fake-storage" / "st.trees" / location.strip("/")
    source.mkdir(parents=True)
    (source / "hello").write_text("hi\n")
    done = qrm_cli("filesystem-image", "clone", "web", "-n", "web2", "--to-storage", "other")
    assert done.exit_code == 0, done.stderr
    assert "cloned web into filesystem image web2 (other:/volumes/web2)" in done.stdout
    shown = done.stderr.splitlines()
    assert (
        shown[0] == "making a 100 MB volume on other"
        and shown[-1] == "making the image from the copied files"
    )
    assert any(line.startswith("copied ") for line in shown), shown
    copy = settings.state_dir / "fake-storage" / "other.trees" / "volumes" / "web2" / "hello"
    assert copy.read_text() == "hi\n"
    refused = qrm_cli("filesystem-image", "clone", "web", "-n", "web2", "-s", "other")
    assert refused.exit_code != 0 and refused.stderr.strip().splitlines() == [
        "error: filesystem image 'web2' already exists"
    ], refused.stderr
