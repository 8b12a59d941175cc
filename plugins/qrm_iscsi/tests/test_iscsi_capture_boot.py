"""Issue 12, test 1: a running "machine" captured over SSH + rsync into an iSCSI image, and a
VM booted from that image sees a file that was on the machine.

The set-up is test_iscsi_boot.py's (``qrm server`` in a lab namespace, tgtd and sshd on a
storage host managed over SSH, a QEMU VM under TCG booting qrm's boot image). The machine
to capture is the storage host's own sshd serving a prepared root tree (busybox, a start
script, a marker file); qrm's capture runs its rsync on the storage server, which logs in
to the machine from there, and builds the LUN's ext4 from what it copied.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_iscsi_boot import MAC, STORAGE_IP, VM_IP, kernel_deb, lab, machine  # noqa: F401 - the fixture

from qrm_core import remote
from qrm_core.models import ResourceState, VEState
from qrm_core.services import agent, boot, boot_build, images, site, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.testkit import RunnerInNetns, qemu_direct_boot, stop_process

VE_START = """#!/bin/sh
echo "qrm-test-ve: marker $(cat /etc/marker) root $(grep ' / ' /proc/mounts | head -n 1)" > /dev/console
"""


def machine_tree(root: Path) -> Path:
    for directory in ("bin", "etc/qrm", "etc/ssh", "proc", "sys", "dev", "run", "tmp", "var"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "etc" / "qrm" / "ve-start").write_text(VE_START)
    (root / "etc" / "qrm" / "ve-start").chmod(0o755)
    (root / "etc" / "marker").write_text("captured-from-the-running-machine\n")
    (root / "etc" / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("the machine's own host key\n")
    (root / "proc" / "junk").write_text("not copied\n")
    return root


def test_a_vm_boots_a_captured_image_and_sees_the_machine_s_file(
    lab: Any,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qrm_iscsi import driver as iscsi_driver

    netns, server, host, backing, user_key, known = lab
    deb = kernel_deb()
    tree = machine_tree(tmp_path / "machine")

    def runner(settings: Any, target: Any) -> Any:
        inner = remote.runner_for(settings.data_dir, target.name, target.address, target.settings)
        return RunnerInNetns(netns, inner)

    monkeypatch.setattr(images, "storage_runner", runner)
    monkeypatch.setattr(iscsi_driver, "storage_runner", runner)
    with server.ctx() as ctx:
        boot_build.create_boot_image(
            ctx,
            name="idle",
            kernel_version=deb.name.split("_")[0].removeprefix("linux-image-"),
            kernel_deb=deb,
            cmdline="console=ttyS0,115200n8 panic=-1",
        )
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
        image = images.capture_filesystem_image(
            ctx, name="web", storage="san", source=f"root@{STORAGE_IP}:{tree}/",
            identity=user_key.read_text(), size_mb=64,
        )  # fmt: skip
        assert (image.state, image.origin) == ("ready", "captured")
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="web")
        agent.register(ctx, mac=MAC, ip=VM_IP, cpus=2, memory_mb=256)
        ves.start_ve(ctx, "web")
    lun = backing / "web.img"
    for path, want in (("/etc/machine-id", ""), ("/etc/ssh/ssh_host_ed25519_key", ""), ("/proc/junk", "")):
        got = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(lun)], capture_output=True, text=True
        ).stdout
        assert got == want, path
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
    log = tmp_path / "console.log"
    with open(log, "wb") as console:
        vm = netns.popen(
            qemu_direct_boot(config.kernel_path, config.initrd_path, config.cmdline, MAC),
            stdout=console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            server.wait(lambda ctx: machine(ctx).state == ResourceState.ACTIVE.value, 150, "the VE active")
            server.wait(lambda ctx: ves.show_ve(ctx, "web").state == VEState.RUNNING.value, 15, "VE running")
            text = log.read_text(errors="replace")
            assert "qrm-test-ve: marker captured-from-the-running-machine root /dev/sda / ext4 rw," in text, (
                text[-3000:]
            )
            with server.ctx() as ctx:
                ves.stop_ve(ctx, "web")
            vm.wait(60)
        finally:
            stop_process(vm)
