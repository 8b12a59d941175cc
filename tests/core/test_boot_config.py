"""The boot configuration per MAC: idle, VE, and nothing to boot."""

from pathlib import Path

import pytest

from qrm_core import hookimpl
from qrm_core.errors import PluginError
from qrm_core.services import boot, boot_images, resources, storage
from qrm_core.services import virtual_environments as ves


def test_unknown_machine_without_boot_image_has_nothing_to_boot(qrm_ctx) -> None:
    config = boot.boot_config(qrm_ctx, "52:54:00:00:00:01")
    assert config.mode == "none" and "boot-image add" in config.message


def test_idle_and_ve_boots(qrm_ctx, qrm_plugins, tmp_path: Path) -> None:
    class Console:
        @hookimpl
        def qrm_boot_kernel_args(self, resource, ve):
            return ["console=ttyS0"] if ve is not None else []

    qrm_plugins.register(Console(), "console")
    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "i").write_bytes(b"i")
    boot_images.add_boot_image(
        qrm_ctx,
        name="idle",
        kernel_version="6.1",
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        cmdline="quiet",
    )
    config = boot.boot_config(
        qrm_ctx, "52-54-00-00-00-01", server_url="http://10.0.0.1:8080/", enrollment_token="abc"
    )
    assert config.mode == "idle" and config.resource_id is None
    assert config.kernel_url == "http://10.0.0.1:8080/boot/idle/vmlinuz"
    assert config.cmdline == (
        "quiet qrm.server=http://10.0.0.1:8080 qrm.mac=52:54:00:00:00:01 "
        "qrm.gen=0 qrm.enroll=abc qrm.mode=idle"
    )
    assert Path(config.kernel_path).read_bytes() == b"k"

    storage.add_storage(qrm_ctx, name="st", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="root", storage="st", location="/exports/root")
    web = ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root", kernel_args="nomodeset")
    ves.start_ve(qrm_ctx, "web")
    res = resources.add_resource(qrm_ctx, mac="52:54:00:00:00:01")
    row = resources.find_resource_row(qrm_ctx, res.id)
    resources.transition(qrm_ctx, row, "idle")
    row.ve_id = web.id
    row.boot_generation = 3
    resources.transition(qrm_ctx, row, "assigned")
    qrm_ctx.commit()
    config = boot.boot_config(qrm_ctx, "52:54:00:00:00:01")
    assert config.mode == "ve" and config.ve == "web" and config.boot_generation == 3
    assert config.cmdline.split() == [
        "quiet",
        "qrm.mac=52:54:00:00:00:01",
        "qrm.gen=3",
        "qrm.mode=ve",
        "qrm.ve=web",
        "qrm.root=fake:10.0.0.2:/exports/root",
        "nomodeset",
        "console=ttyS0",
    ]
    assert config.root == "fake 10.0.0.2:/exports/root"
    # A stopping VE's machines boot idle (and are released when they register).
    ves.stop_ve(qrm_ctx, "web")
    assert boot.boot_config(qrm_ctx, "52:54:00:00:00:01").mode == "idle"


def test_a_plugin_cannot_inject_into_the_command_line(qrm_ctx, qrm_plugins, tmp_path: Path) -> None:
    class Evil:
        @hookimpl
        def qrm_boot_kernel_args(self):
            return ["a\nkernel http://evil/x"]

    qrm_plugins.register(Evil(), "evil")
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")
    resources.add_resource(qrm_ctx, mac="52:54:00:00:00:05")
    with pytest.raises(PluginError, match="kernel arguments from plugins"):
        boot.boot_config(qrm_ctx, "52:54:00:00:00:05")
