"""A VE whose root is an iSCSI LUN, booted for real: ``qrm server`` (with this plugin)
manages a tgtd on a storage host over SSH; when the engine assigns the machine it binds
the machine's initiator name to the target; a QEMU VM (TCG) booting qrm's boot image
registers, fetches the image's CHAP account over its authenticated channel, logs in with
iscsistart, mounts the LUN read-write, runs the VE's start script and reports active.
What the VE wrote is in the LUN's file afterwards; the CHAP secret is nowhere in the
kernel command line, the console, the events or the server's log.

The machine registered as idle beforehand through the services (the idle boot itself is
core's test_boot_qemu.py). Needs root, QEMU, busybox-static, open-iscsi (for the boot
image's iscsistart), tgt, openssh-server, e2fsprogs and a Debian kernel package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import select

from qrm_core.models import Resource, ResourceState, StorageServer, VEState
from qrm_core.services import agent, boot, boot_build, events, site, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import missing
from qrm_core.testkit import (
    Netns,
    QrmServerProcess,
    StorageHost,
    Udhcpd,
    missing_storage_tools,
    qemu_direct_boot,
    stop_process,
)

SERVER_IP = "10.231.12.1"
STORAGE_IP = "10.231.12.35"
MAC = "52:54:00:53:0e:01"
VM_IP = "10.231.12.50"
VE_START = """#!/bin/sh
echo "started on $(cat /run/qrm/ip)" > /var/ve-started
echo "qrm-test-ve: root $(grep ' / ' /proc/mounts | head -n 1)" > /dev/console
"""


def kernel_deb() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qrm-test" / "kernel"
    found = sorted(cache.glob("linux-image-*.deb"))
    if not found:
        missing(
            "a Debian kernel package", f"put a linux-image-*.deb into {cache} (core's tests download one)"
        )
    return found[-1]


def image_file(path: Path, work: Path) -> None:
    """An ext4 image holding busybox and a start script that writes into the root."""
    tree = work / "tree"
    for directory in ("bin", "etc/qrm", "proc", "sys", "dev", "run", "tmp", "var"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/bin/busybox", tree / "bin" / "busybox")
    (tree / "bin" / "busybox").chmod(0o755)
    (tree / "bin" / "sh").symlink_to("busybox")
    (tree / "etc" / "qrm" / "ve-start").write_text(VE_START)
    (tree / "etc" / "qrm" / "ve-start").chmod(0o755)
    subprocess.run(["truncate", "-s", "64M", str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path)], check=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Netns, QrmServerProcess, StorageHost, Path, Path, str]]:
    if os.geteuid() != 0:
        missing("root", "network namespaces and QEMU taps need root")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("/usr/sbin/iscsistart", "open-iscsi")):
        if shutil.which(tool) is None:
            missing(tool, f"apt-get install {package}")
    absent = missing_storage_tools("nsenter", "unshare", "tgtd", "tgtadm", "sshd", "ssh")
    if absent:
        missing("tgt and sshd", f"apt-get install {' '.join(absent)}")
    netns = Netns("iboot")
    udhcpd = server = host = None
    try:
        netns.ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        netns.ip("addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        netns.ip("link", "set", "br0", "up")
        netns.ip("tuntap", "add", "dev", "tap0", "mode", "tap")
        netns.ip("link", "set", "tap0", "master", "br0")
        netns.ip("link", "set", "tap0", "up")
        udhcpd = Udhcpd(
            netns, "br0", tmp_path / "dhcp", "10.231.12.100", "10.231.12.150", static={MAC: VM_IP}
        )
        host = StorageHost("ibst", tmp_path / "host", STORAGE_IP, bridge_netns=netns.name, bridge="br0")
        host.start_tgtd()
        user_key, known = host.start_sshd()
        backing = tmp_path / "luns"
        backing.mkdir()
        server = QrmServerProcess(netns, SERVER_IP, 8080, tmp_path)
        yield netns, server, host, backing, user_key, known
    finally:
        if server is not None:
            server.stop()
        if host is not None:
            host.stop()
        if udhcpd is not None:
            udhcpd.stop()
        netns.delete()


def machine(ctx) -> Resource:
    row = ctx.session.exec(select(Resource).where(Resource.mac == MAC)).first()
    assert row is not None
    return row


def test_a_vm_boots_its_ve_from_an_iscsi_lun(lab, tmp_path: Path) -> None:
    netns, server, host, backing, user_key, known = lab
    deb = kernel_deb()
    image_file(backing / "web.img", tmp_path)
    with server.ctx() as ctx:
        built = boot_build.create_boot_image(
            ctx,
            name="idle",
            kernel_version=deb.name.split("_")[0].removeprefix("linux-image-"),
            kernel_deb=deb,
            cmdline="console=ttyS0,115200n8 panic=-1",
        )
        # As the article's command, by address, managed over SSH; checked from the lab's network.
        netns.inside(
            lambda: storage.add_storage(
                ctx,
                name="san",
                type="iscsi",
                address=STORAGE_IP,
                settings={
                    "backing_dir": str(backing),
                    "tgt_control_port": "17",
                    "state_dir": str(tmp_path / "iscsi-state"),
                },
                ssh=storage.SshChange(user="root", key=user_key.read_text(), host_key=known),
            )
        )
        row = ctx.session.exec(select(StorageServer).where(StorageServer.name == "san")).one()
        san = storage.target(row)  # plain values: the services below end reads, which expires the row
        storage.add_filesystem_image(ctx, name="web", storage="san", location="web")
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="web")
        agent.register(ctx, mac=MAC, ip=VM_IP, cpus=2, memory_mb=256)
        ves.start_ve(ctx, "web")
    assert built.initrd_path
    server.wait(lambda ctx: machine(ctx).state == ResourceState.ASSIGNED.value, 15, "the engine's assignment")
    initiator = f"iqn.2026-12.org.qrm:{MAC.replace(':', '')}"
    deadline = time.monotonic() + 30
    while initiator not in host.tgtadm("--op", "show", "--mode", "target").stdout:
        assert time.monotonic() < deadline, "the engine did not export the LUN to the machine"
        time.sleep(0.2)

    with server.ctx() as ctx:
        config = boot.boot_config(
            ctx, MAC, server_url=server.url, enrollment_token=site.get_enrollment_token(ctx)
        )
    target = "iqn.2026-12.org.qrm.storage:san.web"
    assert f"qrm.iscsi={STORAGE_IP}:3260:1:{target}" in config.cmdline
    assert f"qrm.initiator={initiator}" in config.cmdline and " rw" in config.cmdline
    from qrm_core.plugins import PluginSystem

    driver = PluginSystem(server.settings).load().storage_driver("iscsi")
    secret = driver.chap_secret(san, "web")  # type: ignore[attr-defined]
    assert secret not in config.cmdline

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
            server.wait(lambda ctx: machine(ctx).state == ResourceState.ACTIVE.value, 120, "the VE active")
            active_after = time.monotonic() - started
            server.wait(lambda ctx: ves.show_ve(ctx, "web").state == VEState.RUNNING.value, 15, "VE running")
            text = log.read_text(errors="replace")
            assert f"logging in to {target} at {STORAGE_IP}:3260 as {initiator} (CHAP user qrm-web)" in text
            assert "qrm-test-ve: root /dev/sda / ext4 rw," in text, text[-3000:]
            # Stopping the VE: the agent syncs and reboots (QEMU's -no-reboot ends the VM).
            with server.ctx() as ctx:
                ves.stop_ve(ctx, "web")
            vm.wait(60)
        finally:
            stop_process(vm)
    # What the VE wrote is in the LUN's file.
    written = subprocess.run(
        ["debugfs", "-R", "cat /var/ve-started", str(backing / "web.img")], capture_output=True, text=True
    )
    assert written.stdout.strip() == f"started on {VM_IP}", written.stderr
    # The secret went to the agent only.
    with server.ctx() as ctx:
        messages = [e.message for e in events.list_events(ctx, limit=200)]
    assert any("fetched the credentials of filesystem image web" in m for m in messages), messages
    for where in (
        "\n".join(messages),
        log.read_text(errors="replace"),
        server.log_path.read_text(errors="replace"),
    ):
        assert secret not in where
    print(f"iSCSI root: power-on to VE active {active_after:.1f} s")
