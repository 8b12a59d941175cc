"""Auto images (``qrm filesystem-image add --auto --fill-from SOURCE``): filled on the first
start of a VE that uses them, by the engine, once; meanwhile no machine is placed into the
VE and the VE says why; on SQLite, PostgreSQL and MariaDB. The fake storage's volumes are
real directories here, so what was filled is checked file by file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from enginekit import Site
from sqlmodel import select

from qrm_core.errors import AlreadyExists, InvalidInput, NotFound, QrmError
from qrm_core.models import Event, FilesystemImage
from qrm_core.services import boot_images, images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.services import virtual_environments as ves
from qrm_core.testkit import make_root_tree


def ctx_for(settings: Any, plugins: Any) -> Any:
    return service_context(settings, actor="tester", plugins=plugins)


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, Path]:
    root = make_root_tree(tmp_path / "root", data_mb=1)
    path = tmp_path / "root.tar.gz"
    subprocess.run(["tar", "-czf", str(path), "--numeric-owner", "-C", str(root), "."], check=True)
    return path, root


@pytest.fixture
def site(qrm_settings: Any, qrm_plugins: Any) -> Site:
    with ctx_for(qrm_settings, qrm_plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")
    return Site(qrm_settings, qrm_plugins)


def files(root: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(root)): os.readlink(p)
        if p.is_symlink()
        else p.read_bytes()
        if p.is_file()
        else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_two_ves_start_at_once_and_the_image_is_filled_once(site: Site, archive: tuple[Path, Path]) -> None:
    settings, plugins = site.settings, site.plugins
    path, root = archive
    site.add_node("52:54:00:00:00:0a")
    site.add_node("52:54:00:00:00:0b")
    with ctx_for(settings, plugins) as ctx:
        added = storage_service.add_filesystem_image(
            ctx, name="jail", storage="st", size_mb=512, fill_from=str(path), comment="from an archive"
        )
        assert (added.origin, added.state, added.progress) == ("auto", "creating", images.AUTO_WAITING)
        for name in ("dev1", "dev2"):  # shared: two VEs on one image mount it read-only
            ves.create_ve(
                ctx, name=name, boot_image="idle", fs_image="jail", deployment="shared", pool_size=1
            )
        ves.start_ve(ctx, "dev1")
        ves.start_ve(ctx, "dev2")
    site.reconciler.tick()
    with ctx_for(settings, plugins) as ctx:
        # A second filler (another server, a retry) while the engine's fill runs, or after: it does not fill again.
        images.fill_auto_image(ctx, "jail")
    site.reconciler.auto_images.join()
    site.settle(4)
    with ctx_for(settings, plugins) as ctx:
        image = storage_service.show_filesystem_image(ctx, "jail")
        assert (image.state, image.progress) == ("ready", "")
        for name in ("dev1", "dev2"):
            shown = ves.show_ve(ctx, name)
            assert shown.state == "running" and len(shown.resources) == 1, shown
        started = [
            e
            for e in ctx.session.exec(select(Event)).all()
            if "filling from" in e.message and "started" in e.message
        ]
    assert len(started) == 1
    tree = settings.state_dir / "fake-storage" / "st.trees" / image.location.strip("/")
    assert files(tree) == files(root)


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_no_machine_boots_a_half_made_image(
    site: Site, archive: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, plugins = site.settings, site.plugins
    path, _ = archive
    site.add_node("52:54:00:00:00:0a")
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_filesystem_image(ctx, name="jail", storage="st", size_mb=512, fill_from=str(path))
        ves.create_ve(ctx, name="dev1", boot_image="idle", fs_image="jail")
        ves.start_ve(ctx, "dev1")
    # The fill is held back: the engine's passes go on and place nothing.
    monkeypatch.setattr(images, "fill_auto_image", lambda ctx, name, progress=None: False)
    site.settle(3)
    with ctx_for(settings, plugins) as ctx:
        shown = ves.show_ve(ctx, "dev1")
    assert (
        shown.resources == []
        and shown.problem == f"creating its filesystem image jail: {images.AUTO_WAITING}"
    )


def test_filling_from_another_image_and_a_failed_fill(site: Site, archive: tuple[Path, Path]) -> None:
    settings, plugins = site.settings, site.plugins
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_filesystem_image(ctx, name="golden", storage="st", size_mb=100)
        storage_service.add_filesystem_image(ctx, name="copy", storage="st", size_mb=100, fill_from="golden")
        ves.create_ve(ctx, name="dev1", boot_image="idle", fs_image="copy")
        assert images.fill_auto_image(ctx, "copy") is True
        assert storage_service.show_filesystem_image(ctx, "copy").state == "ready"
        assert images.fill_auto_image(ctx, "copy") is False  # once
        broken = archive[0].parent / "broken.tar"
        broken.write_bytes(b"not an archive" * 100)
        storage_service.add_filesystem_image(
            ctx, name="bad", storage="st", size_mb=100, fill_from=str(broken)
        )
        with pytest.raises(InvalidInput, match="not a tar archive"):
            images.fill_auto_image(ctx, "bad")
        bad = storage_service.show_filesystem_image(ctx, "bad")
        assert bad.state == "error" and "filling failed" in bad.progress
        ves.create_ve(ctx, name="dev2", boot_image="idle", fs_image="bad")
        ves.start_ve(ctx, "dev2")
    site.settle(2)
    with ctx_for(settings, plugins) as ctx:
        assert ves.show_ve(ctx, "dev2").problem.startswith(
            "its filesystem image bad is not ready (error: filling failed"
        )


def test_bad_input_is_one_line_and_nothing_is_made(site: Site, archive: tuple[Path, Path]) -> None:
    settings, plugins = site.settings, site.plugins
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_storage(ctx, name="other", type="fake", address="10.0.11.36")
        storage_service.add_filesystem_image(ctx, name="elsewhere", storage="other", size_mb=10)

    def state() -> tuple[Any, ...]:
        with ctx_for(settings, plugins) as ctx:
            names = ctx.session.exec(select(FilesystemImage.name)).all()
            count = len(ctx.session.exec(select(Event)).all())
        fake = settings.state_dir / "fake-storage" / "st.json"
        return tuple(sorted(names)), count, fake.read_text() if fake.exists() else ""

    before = state()
    cases: list[tuple[dict[str, Any], type[QrmError], str]] = [
        ({"fill_from": "nosuch"}, NotFound, "to fill auto from"),
        ({"fill_from": "elsewhere"}, InvalidInput, "on another storage server"),
        ({"fill_from": "/no/such/archive.tar"}, InvalidInput, "is not a file here"),
        ({"fill_from": "ftp://x/y"}, InvalidInput, "is not a file here"),
        ({"fill_from": str(archive[0]), "sha256": "12"}, InvalidInput, "64 hexadecimal digits"),
        ({"fill_from": "elsewhere", "sha256": "0" * 64}, InvalidInput, "on another storage server"),
        ({"fill_from": str(archive[0]), "size_mb": None}, InvalidInput, "give --size"),
        ({"fill_from": str(archive[0]), "location": "/exports/x"}, InvalidInput, "not a location"),
        ({"fill_from": str(archive[0]), "name": "a b"}, InvalidInput, "name"),
    ]
    for change, error, said in cases:
        options: dict[str, Any] = {"name": "auto", "storage": "st", "size_mb": 100}
        options.update(change)
        with ctx_for(settings, plugins) as ctx, pytest.raises(error) as info:
            storage_service.add_filesystem_image(ctx, **options)
        assert said in str(info.value) and "\n" not in str(info.value), (change, str(info.value))
        assert state() == before, change
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_filesystem_image(
            ctx, name="auto", storage="st", size_mb=10, fill_from=str(archive[0])
        )
    with ctx_for(settings, plugins) as ctx, pytest.raises(AlreadyExists):
        storage_service.add_filesystem_image(
            ctx, name="auto", storage="st", size_mb=10, fill_from=str(archive[0])
        )


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_command(site: Site, qrm_cli: Any, archive: tuple[Path, Path]) -> None:
    done = qrm_cli(
        "filesystem-image",
        "add",
        "-n",
        "jail",
        "-s",
        "st",
        "--size",
        "100",
        "--auto",
        "--fill-from",
        str(archive[0]),
    )
    assert done.exit_code == 0 and "filled from" in done.stdout, done.stderr
    half = qrm_cli("filesystem-image", "add", "-n", "x", "-s", "st", "--size", "100", "--auto")
    assert half.exit_code != 0 and "--auto and --fill-from go together" in half.stderr


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_api(qrm_server: Any, archive: tuple[Path, Path]) -> None:
    with qrm_server.client() as api:
        assert (
            api.post(
                "/api/v1/storage", json={"name": "st", "type": "fake", "address": "10.0.11.35"}
            ).status_code
            == 201
        )
        assert (
            api.post(
                "/api/v1/filesystem-images", json={"name": "golden", "storage": "st", "size_mb": 10}
            ).status_code
            == 201
        )
        made = api.post(
            "/api/v1/filesystem-images",
            json={"name": "copy", "storage": "st", "size_mb": 10, "fill_from": "golden"},
        )
        assert (
            made.status_code == 201
            and made.json()["origin"] == "auto"
            and made.json()["source"] == "image golden"
        )
        local = api.post(
            "/api/v1/filesystem-images",
            json={"name": "x", "storage": "st", "size_mb": 10, "fill_from": str(archive[0])},
        )
        assert local.status_code == 422 and "another image, an http(s) URL or local-disk" in local.text
        assert api.get("/api/v1/filesystem-images/x").status_code == 404


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_reset_of_a_running_pristine_ve_with_a_machine(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """``reset_ve`` keeps the VE's machine: it reboots, holds its boot in the initrd while
    the image is reverted, and boots on into the VE, which runs again on the same
    machine. The engine's passes run while the service waits (its sleep is a pass here)."""
    import time

    settings, plugins = site.settings, site.plugins
    node = site.add_node("52:54:00:00:00:0a")
    with ctx_for(settings, plugins) as ctx:
        storage_service.add_filesystem_image(ctx, name="golden", storage="st", size_mb=100)
        ves.create_ve(ctx, name="team", boot_image="idle", fs_image="golden", pristine=True)
        ves.start_ve(ctx, "team")
    site.settle(3)
    with ctx_for(settings, plugins) as ctx:
        assert ves.show_ve(ctx, "team").state == "running" and node.mode == "ve"

    class EngineWhileWaiting:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            site.step()

    monkeypatch.setattr(images, "time", EngineWhileWaiting)
    lines: list[str] = []
    with ctx_for(settings, plugins) as ctx:
        result = images.reset_ve(ctx, "team", poll=0.05, timeout=60, progress=lines.append)
        assert result.desired_state == "running"
        images.wait_reset_active(ctx, "team", timeout=60, poll=0.05)
    assert [line.split()[0] for line in lines] == ["team:", "team:", "reverting", "reset"], lines
    with ctx_for(settings, plugins) as ctx:
        shown = ves.show_ve(ctx, "team")
        messages = [e.message for e in ctx.session.exec(select(Event).order_by(Event.id)).all()]
    assert shown.state == "running" and shown.resources == [node.mac]
    order = [m for m in messages if "reset" in m or "requested" in m]
    assert order[-2:] == [
        "virtual environment team reset requested: its machines reboot, held until its image is reverted",
        "virtual environment team reset: golden reverted to its first start (done); its machines boot on into it",
    ]
    assert not [m for m in messages if "-> idle" in m and "registered" not in m], messages
