"""Boot files generated from the database (SQLite, PostgreSQL, MariaDB), fetched over real UDP."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import make_resolver, need_tool
from tftp_client import fetch_sync

from qrm_core import hookimpl
from qrm_core.services import boot_images, resources, site, storage
from qrm_core.services import virtual_environments as ves
from qrm_tftpd.sources import LocalSource

SERVER = "http://10.0.0.1:8080"
UNKNOWN = "52:54:00:00:00:99"
ASSIGNED = "52:54:00:00:00:01"


class Console:
    """A plugin contributing a kernel argument to VE boots."""

    @hookimpl
    def qrm_boot_kernel_args(self, resource, ve):
        return ["console=ttyS0,115200"] if ve is not None else []


@pytest.fixture
def site_setup(qrm_ctx, qrm_plugins, tmp_path: Path) -> dict[str, bytes]:
    qrm_plugins.register(Console(), "console")
    files = {}
    for name in ("idle", "web-kernel"):
        (tmp_path / f"{name}.k").write_bytes(f"kernel of {name}".encode() * 1000)
        (tmp_path / f"{name}.i").write_bytes(f"initrd of {name}".encode())
        boot_images.add_boot_image(
            qrm_ctx,
            name=name,
            kernel_version="6.1",
            kernel=tmp_path / f"{name}.k",
            initrd=tmp_path / f"{name}.i",
            cmdline="quiet",
        )
        files[name] = (tmp_path / f"{name}.k").read_bytes()
    boot_images.set_default_boot_image(qrm_ctx, "idle")
    storage.add_storage(qrm_ctx, name="st", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="root", storage="st", location="/exports/root")
    web = ves.create_ve(
        qrm_ctx, name="web", boot_image="web-kernel", fs_image="root", kernel_args="nomodeset"
    )
    ves.start_ve(qrm_ctx, "web")  # a VE boot is only for a VE that should run
    res = resources.add_resource(qrm_ctx, mac=ASSIGNED)
    row = resources.find_resource_row(qrm_ctx, res.id)
    resources.transition(qrm_ctx, row, "idle")
    row.ve_id = web.id
    row.boot_generation = 4
    resources.transition(qrm_ctx, row, "assigned")
    qrm_ctx.commit()
    return files


def test_boot_scripts_from_the_database(
    qrm_ctx, qrm_settings, qrm_plugins, site_setup, serve, tmp_path
) -> None:
    token = site.get_enrollment_token(qrm_ctx)
    qrm_ctx.commit()  # SQLite: core opens transactions with BEGIN IMMEDIATE; end ours
    source = LocalSource(qrm_settings, server_url=SERVER, plugins=qrm_plugins)
    source.check()
    server = serve(make_resolver(tmp_path / "root", source))
    (tmp_path / "root").mkdir()

    def get(name: str) -> str:
        return fetch_sync("127.0.0.1", server.port, name).data.decode()

    # an unknown machine boots the default (idle) boot image and may enroll
    script = get("ipxe/52-54-00-00-00-99.ipxe")
    idle_args = f"initrd=initrd quiet qrm.server={SERVER} qrm.mac={UNKNOWN} qrm.gen=0 qrm.enroll={token} qrm.mode=idle"
    assert f"kernel {SERVER}/boot/idle/vmlinuz {idle_args} || kernel tftp://${{next-server}}" in script
    assert f"initrd {SERVER}/boot/idle/initrd || initrd tftp://${{next-server}}/boot/idle/initrd" in script

    # the assigned machine boots its VE: its boot image, root, VE and plugin arguments
    script = get("ipxe/52-54-00-00-00-01.ipxe")
    ve_args = (
        f"initrd=initrd quiet qrm.server={SERVER} qrm.mac={ASSIGNED} qrm.gen=4 qrm.enroll={token} qrm.mode=ve "
        "qrm.ve=web qrm.root=fake:10.0.0.2:/exports/root nomodeset console=ttyS0,115200"
    )
    assert f"kernel {SERVER}/boot/web-kernel/vmlinuz {ve_args} ||" in script
    assert (
        "# qrm boot script for 52:54:00:00:00:01: VE web, boot image web-kernel, boot generation 4" in script
    )

    # the same as legacy pxelinux configs
    conf = get("pxelinux.cfg/01-52-54-00-00-00-01")
    assert "  KERNEL boot/web-kernel/vmlinuz\n" in conf
    assert f"  APPEND initrd=boot/web-kernel/initrd {ve_args.removeprefix('initrd=initrd ')}\n" in conf
    conf = get("pxelinux.cfg/01-52-54-00-00-00-99")
    assert "  KERNEL boot/idle/vmlinuz\n" in conf and "qrm.mode=idle" in conf

    # the boot image files over TFTP (the fallback), from the paths in the database
    assert fetch_sync("127.0.0.1", server.port, "boot/web-kernel/vmlinuz").data == site_setup["web-kernel"]
    out = tmp_path / "initrd"
    result = subprocess.run(
        [
            need_tool("curl", "curl"),
            "-sS",
            "-o",
            str(out),
            f"tftp://127.0.0.1:{server.port}/boot/idle/initrd",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == b"initrd of idle"

    # the next request sees the database as it is now: release the machine
    row = resources.find_resource_row(qrm_ctx, ASSIGNED)
    row.ve_id = None
    resources.transition(qrm_ctx, row, "idle")
    qrm_ctx.commit()
    assert "qrm.mode=idle" in get("ipxe/52-54-00-00-00-01.ipxe")


def test_nothing_to_boot_gets_the_retry_script(qrm_ctx, qrm_settings, qrm_plugins, serve, tmp_path) -> None:
    source = LocalSource(qrm_settings, server_url=None, plugins=qrm_plugins)
    server = serve(make_resolver(tmp_path, source))
    script = fetch_sync("127.0.0.1", server.port, "ipxe/52-54-00-00-00-07.ipxe").data.decode()
    assert "echo qrm: nothing to boot for 52:54:00:00:00:07: no default boot image" in script
    assert "sleep 10\nexit 1\n" in script
    conf = fetch_sync("127.0.0.1", server.port, "pxelinux.cfg/01-52-54-00-00-00-07").data.decode()
    assert "KERNEL pxelinux.0" in conf


def test_a_failing_plugin_gives_a_retry_script_not_a_dead_server(
    qrm_ctx, qrm_settings, qrm_plugins, site_setup, serve, tmp_path
) -> None:
    class Broken:
        @hookimpl
        def qrm_boot_kernel_args(self):
            raise RuntimeError("kaputt")

    qrm_plugins.register(Broken(), "broken")
    source = LocalSource(qrm_settings, server_url=SERVER, plugins=qrm_plugins)
    server = serve(make_resolver(tmp_path, source))
    script = fetch_sync("127.0.0.1", server.port, "ipxe/52-54-00-00-00-01.ipxe").data.decode()
    assert "boot configuration failed: plugin broken failed in qrm_boot_kernel_args: kaputt" in script
    assert "\nkernel " not in script and "\nboot" not in script
    # machines the plugin is not asked about still boot
    assert (
        "qrm.mode=idle" in fetch_sync("127.0.0.1", server.port, "ipxe/52-54-00-00-00-99.ipxe").data.decode()
    )
