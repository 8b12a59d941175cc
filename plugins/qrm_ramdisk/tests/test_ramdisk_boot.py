"""A VE from a ramdisk volume, booted for real: ``qrm server`` (with this plugin) serves
the archive to the machine qrm exported it to, a QEMU VM (TCG, virtio-net) booting
qrm's own boot image fetches it, unpacks it into RAM, runs the VE's start script
and is reported active; any other address gets 403 from the same server.

The machine registered as idle beforehand through the services (the idle boot
itself is core's test_boot_qemu.py); its DHCP lease is a static one, so the
address qrm exports to is the one the VM fetches from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from ramdisklab import Netns, QrmServerProcess, Udhcpd, http_status, kernel_deb, stop_process
from sqlmodel import select

from qrm_core.bootimage import kernel as kernels
from qrm_core.drivers.base import StorageTarget
from qrm_core.models import Resource, ResourceState, VEState
from qrm_core.services import agent, boot, boot_build, boot_images, site, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import missing
from qrm_core.testkit import qemu_direct_boot
from qrm_ramdisk.driver import RamdiskStorage

SERVER_IP = "10.231.2.1"
MAC = "52:54:00:52:0e:01"
VM_IP = "10.231.2.50"


def machine(ctx) -> Resource:
    row = ctx.session.exec(select(Resource).where(Resource.mac == MAC)).first()
    assert row is not None
    return row


@pytest.fixture
def lab(tmp_path: Path):
    if os.geteuid() != 0:
        missing("root", "network namespaces and QEMU taps need root")
    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86 ipxe-qemu"),
        ("/bin/busybox", "busybox-static"),
    ):
        if shutil.which(tool) is None:
            missing(tool, f"apt-get install {package}")
    netns = Netns("rd")
    udhcpd = server = None
    try:
        netns.ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        netns.ip("addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        netns.ip("link", "set", "br0", "up")
        netns.ip("tuntap", "add", "dev", "tap0", "mode", "tap")
        netns.ip("link", "set", "tap0", "master", "br0")
        netns.ip("link", "set", "tap0", "up")
        udhcpd = Udhcpd(netns, "br0", tmp_path / "dhcp", "10.231.2.100", "10.231.2.150", static={MAC: VM_IP})
        server = QrmServerProcess(netns, SERVER_IP, 8080, tmp_path)
        yield netns, server
    finally:
        if server is not None:
            server.stop()
        if udhcpd is not None:
            udhcpd.stop()
        netns.delete()


def test_a_vm_boots_its_ve_from_a_ramdisk_volume(lab, tmp_path: Path) -> None:
    netns, server = lab
    deb = kernel_deb()
    version = kernels._DEB_NAME.match(deb.name).group("kver")  # type: ignore[union-attr]
    root = tmp_path / "root"
    (root / "etc" / "qrm").mkdir(parents=True)
    (root / "etc" / "qrm" / "ve-start").write_text("#!/bin/sh\necho 'ramdisk VE says hello' > /dev/console\n")
    (root / "etc" / "qrm" / "ve-start").chmod(0o755)

    with server.ctx() as ctx:
        boot_build.create_boot_image(
            ctx,
            name="idle",
            kernel_version=version,
            kernel_deb=deb,
            cmdline="console=ttyS0,115200n8 panic=-1",
        )
        storage.add_storage(ctx, name="ram", type="ramdisk", address=SERVER_IP)
        driver = RamdiskStorage(server.settings)
        target = StorageTarget(name="ram", type="ramdisk", address=SERVER_IP)
        driver.import_volume(target, "web", root, size_mb=64)
        storage.add_filesystem_image(ctx, name="web", storage="ram", location="web")
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="web")
        agent.register(ctx, mac=MAC, ip=VM_IP, cpus=2, memory_mb=256)
        ves.start_ve(ctx, "web")
    server.wait(
        lambda ctx: machine(ctx).state == ResourceState.ASSIGNED.value,
        15,
        "the engine to assign the machine",
    )
    # The engine exports the volume right after committing the assignment.
    deadline = time.monotonic() + 15
    while driver.list_volumes(target)[0].exported_to != (VM_IP,) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert driver.list_volumes(target)[0].exported_to == (VM_IP,)

    with server.ctx() as ctx:
        config = boot.boot_config(
            ctx, MAC, server_url=server.url, enrollment_token=site.get_enrollment_token(ctx)
        )
    url = f"{server.url}/plugins/ramdisk/ram/web"
    assert config.mode == "ve" and f"qrm.rootfs={url} qrm.rootfs_size=64" in config.cmdline
    assert http_status(netns, url, SERVER_IP) == 403  # not exported to the server's own address

    log = tmp_path / "console.log"
    with open(log, "wb") as console:
        vm = netns.popen(
            qemu_direct_boot(config.kernel_path, config.initrd_path, config.cmdline, MAC),
            stdout=console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        started = time.monotonic()
        try:
            server.wait(
                lambda ctx: machine(ctx).state == ResourceState.ACTIVE.value,
                90,
                "the VE to be active",
            )
            active_after = time.monotonic() - started
            server.wait(lambda ctx: ves.show_ve(ctx, "web").state == VEState.RUNNING.value, 15, "VE running")
        finally:
            stop_process(vm)
    text = log.read_text(errors="replace")
    assert f"fetching the VE root filesystem from {url}" in text
    assert "ramdisk VE says hello" in text and "/etc/qrm/ve-start finished" in text
    with server.ctx() as ctx:
        row = machine(ctx)
        assert row.state == ResourceState.ACTIVE.value and row.ip == VM_IP
        assert boot_images.show_boot_image(ctx, "idle").is_default
    print(f"power-on to VE active: {active_after:.1f} s")
