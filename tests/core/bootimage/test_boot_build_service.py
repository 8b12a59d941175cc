"""``create_boot_image`` / ``ensure_default_boot_image`` (the services) and ``qrm boot-image create``.

The tests on every database backend build from the kernel tree the session
unpacked once (``kernel_tree=``); unpacking the package (``kernel_deb=``)
costs seconds, so the end-to-end paths from a package file run on SQLite.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from qrm_core import db
from qrm_core.bootimage import builder
from qrm_core.bootimage import kernel as kernels
from qrm_core.cli import boot_build as boot_build_cli
from qrm_core.config import Settings, reset_settings_cache
from qrm_core.errors import AlreadyExists, InvalidInput
from qrm_core.plugins import PluginSystem, set_plugin_system
from qrm_core.services import boot, boot_build, boot_images, events, service_context
from qrm_core.testing import create_test_database


@pytest.fixture
def sqlite_ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A service context on a private SQLite database (the settings are in the environment too)."""
    for key in list(os.environ):
        if key.startswith("QRM_") and not key.startswith("QRM_TEST_"):
            monkeypatch.delenv(key, raising=False)
    database = create_test_database("sqlite", tmp_path)
    monkeypatch.setenv("QRM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("QRM_DATABASE_URL", database.url)
    reset_settings_cache()
    settings = Settings()
    plugins = PluginSystem(settings, discover_plugins=False).load()
    set_plugin_system(plugins)
    try:
        with service_context(settings, actor="tester", plugins=plugins) as ctx:
            yield ctx
    finally:
        set_plugin_system(None)
        reset_settings_cache()
        db.dispose_engines()
        database.engine.dispose()


# SQLite only: the build is the same on each; recording it is a boot image row and an event,
# as in test_services.py::test_boot_images_store_files_and_keep_one_default on all three databases.
@pytest.mark.qrm_backends("sqlite")
def test_create_records_a_bootable_image(qrm_ctx, kernel_tree: kernels.KernelTree) -> None:
    kernel_version = kernel_tree.version
    seen: list[str] = []
    image = boot_build.create_boot_image(
        qrm_ctx,
        name="idle",
        kernel_version=kernel_version,
        kernel_tree=kernel_tree,
        progress=lambda what, done, total: seen.append(what),
    )
    assert image.is_default and image.kernel_version == kernel_version
    assert image.cmdline == builder.DEFAULT_CMDLINE
    assert (
        "built by qrm from package linux-image-" in image.comment
        and "modules; initrd sha256" in image.comment
    )
    initrd, kernel = Path(image.initrd_path), Path(image.kernel_path)
    assert initrd.parent == qrm_ctx.settings.boot_dir / "idle" and initrd.is_file() and kernel.is_file()
    assert image.initrd_sha256 == builder.sha256_of(initrd)
    assert seen[0] == "computing module dependencies" and seen[-1] == "recording the boot image"
    # Nothing of the build is left behind.
    assert not any((qrm_ctx.settings.data_dir / "tmp").iterdir())
    config = boot.boot_config(qrm_ctx, "52:54:00:00:00:09", server_url="http://10.0.0.1:8080")
    assert config.mode == "idle" and config.boot_image == "idle"
    assert any("boot image idle added" in e.message for e in events.list_events(qrm_ctx, limit=5))

    # The same inputs again (another name): the same initrd.
    again = boot_build.create_boot_image(
        qrm_ctx, name="idle2", kernel_version=kernel_version, kernel_tree=kernel_tree, cmdline="console=ttyS0"
    )
    assert again.initrd_sha256 == image.initrd_sha256 and not again.is_default
    assert again.cmdline == "console=ttyS0"


def test_bad_input_changes_nothing(qrm_ctx, kernel_tree: kernels.KernelTree, kernel_deb: Path) -> None:
    kernel_version = kernel_tree.version
    boot_images.add_boot_image(qrm_ctx, name="taken", kernel_version="1.0")
    cases = [
        (AlreadyExists, dict(name="taken", kernel_version=kernel_version, kernel_deb=kernel_deb)),
        (InvalidInput, dict(name="bad name!", kernel_version=kernel_version, kernel_deb=kernel_deb)),
        (InvalidInput, dict(name="x", kernel_version="6.1;reboot", kernel_deb=kernel_deb)),
        (InvalidInput, dict(name="x", kernel_version="5.10.0-1-amd64", kernel_deb=kernel_deb)),
        (InvalidInput, dict(name="x", kernel_version=kernel_version, kernel_deb="/nonexistent.deb")),
        (
            InvalidInput,
            dict(name="x", kernel_version=kernel_version, kernel_tree=kernel_tree, cmdline="a 'b'"),
        ),
        (
            InvalidInput,
            dict(name="x", kernel_version=kernel_version, kernel_tree=kernel_tree, extra_modules=["no"]),
        ),
        (InvalidInput, dict(name="x", kernel_version="1.0", kernel_tree=kernel_tree)),
        (InvalidInput, dict(name="x", kernel_version="9.9.9-nowhere")),  # not in /boot
    ]
    for error, kwargs in cases:
        with pytest.raises(error) as raised:
            boot_build.create_boot_image(qrm_ctx, **kwargs)
        assert "\n" not in raised.value.message
    assert [b.name for b in boot_images.list_boot_images(qrm_ctx)] == ["taken"]
    assert not (qrm_ctx.settings.boot_dir / "x").exists()
    assert not any((qrm_ctx.settings.data_dir / "tmp").iterdir())


def test_from_a_package_file(sqlite_ctx, kernel_deb: Path, kernel_version: str, kernel_tree) -> None:
    """The whole path: dpkg-deb unpacks, depmod computes, the same initrd as from the session's tree."""
    seen: list[str] = []
    image = boot_build.create_boot_image(
        sqlite_ctx,
        name="idle",
        kernel_version=kernel_version,
        kernel_deb=kernel_deb,
        progress=lambda what, done, total: seen.append(what),
    )
    assert seen[0].startswith("unpacking ") and image.is_default
    reference = boot_build.create_boot_image(
        sqlite_ctx, name="ref", kernel_version=kernel_version, kernel_tree=kernel_tree
    )
    assert image.initrd_sha256 == reference.initrd_sha256
    assert not any((sqlite_ctx.settings.data_dir / "tmp").iterdir())


def unpacked_once(monkeypatch: pytest.MonkeyPatch, tree: kernels.KernelTree) -> list[dict[str, Any]]:
    """Make the service take the session's unpacked tree instead of unpacking the package
    again (test_from_a_package_file covers unpacking); returns the calls it saw."""
    calls: list[dict[str, Any]] = []

    def resolve(version: str, **kwargs: Any) -> kernels.KernelTree:
        calls.append(dict(kwargs, version=version))
        if version != tree.version:
            raise InvalidInput(f"holds kernel {tree.version}, not {version}")
        return tree

    monkeypatch.setattr(builder, "resolve_kernel", resolve)
    return calls


def test_default_boot_image_for_qrm_init(
    sqlite_ctx, kernel_tree: kernels.KernelTree, kernel_deb: Path, monkeypatch
) -> None:
    qrm_ctx = sqlite_ctx
    kernel_version = kernel_tree.version
    calls = unpacked_once(monkeypatch, kernel_tree)
    empty = qrm_ctx.settings.data_dir / "no-boot"  # this machine's /boot is not the test's
    empty.mkdir(parents=True)
    text = boot_build.ensure_default_boot_image(qrm_ctx, boot_dir=empty, modules_root=empty)
    assert text.startswith("no kernel to build the default boot image from") and "--download" in text
    cache = boot_build.kernel_cache_dir(qrm_ctx.settings)
    cache.mkdir(parents=True)
    (cache / kernel_deb.name).symlink_to(kernel_deb)
    text = boot_build.ensure_default_boot_image(qrm_ctx, boot_dir=empty, modules_root=empty)
    assert text == f"built the default boot image default (kernel {kernel_version} from {kernel_deb.name})"
    assert calls[-1]["kernel_deb"] == boot_build.kernel_cache_dir(qrm_ctx.settings) / kernel_deb.name
    assert boot_images.show_boot_image(qrm_ctx, "default").is_default
    assert boot_build.ensure_default_boot_image(qrm_ctx) == (
        f"the default boot image is default (kernel {kernel_version})"
    )


def test_download_reuses_the_cache(tmp_path: Path, kernel_deb: Path, kernel_version: str) -> None:
    """--download finds the package in the cache (the network is used only when it is missing)."""
    cache = tmp_path / "kernels"
    cache.mkdir(parents=True)
    (cache / kernel_deb.name).symlink_to(kernel_deb)
    assert kernels.download_deb(kernel_version, cache) == cache / kernel_deb.name


def test_cli_create(sqlite_ctx, kernel_tree: kernels.KernelTree, kernel_deb: Path, monkeypatch) -> None:
    """The command mounted under ``qrm boot-image`` (here on a group of its own)."""
    kernel_version = kernel_tree.version
    calls = unpacked_once(monkeypatch, kernel_tree)
    boot_app = typer.Typer()

    @boot_app.callback()
    def group() -> None:
        pass

    boot_build_cli.register(boot_app)
    runner = CliRunner()
    done = runner.invoke(
        boot_app,
        [
            "create",
            "-n",
            "idle",
            "-k",
            kernel_version,
            "--kernel-deb",
            str(kernel_deb),
            "--default",
            "-o",
            "json",
        ],
    )
    assert done.exit_code == 0, done.output
    shown = json.loads(done.stdout)
    assert shown["name"] == "idle" and shown["is_default"] and len(shown["initrd_sha256"]) == 64
    assert calls[0]["kernel_deb"] == kernel_deb and calls[0]["download"] is False
    done = runner.invoke(boot_app, ["create", "-n", "other", "-k", "1.2.3", "--kernel-deb", str(kernel_deb)])
    assert isinstance(done.exception, InvalidInput)
    assert "holds kernel" in done.exception.message


def test_default_boot_image_from_boot(sqlite_ctx, kernel_tree: kernels.KernelTree, tmp_path: Path) -> None:
    """An installed kernel (/boot + /lib/modules layout) when no package is cached."""
    boot_dir, modules_root = tmp_path / "boot", tmp_path / "lib" / "modules"
    boot_dir.mkdir()
    modules_root.mkdir(parents=True)
    (boot_dir / f"vmlinuz-{kernel_tree.version}").symlink_to(kernel_tree.vmlinuz)
    (modules_root / kernel_tree.version).symlink_to(kernel_tree.modules_dir)
    text = boot_build.ensure_default_boot_image(sqlite_ctx, boot_dir=boot_dir, modules_root=modules_root)
    assert text == (
        f"built the default boot image default (kernel {kernel_tree.version} "
        f"from {boot_dir / f'vmlinuz-{kernel_tree.version}'})"
    )
    assert boot_images.show_boot_image(sqlite_ctx, "default").is_default
