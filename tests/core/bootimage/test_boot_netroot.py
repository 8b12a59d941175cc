"""VE roots on the network, for real: a QEMU VM (TCG) boots qrm's boot image into a VE
whose root filesystem is a directory exported by nfs-ganesha from a storage host (its
own namespace, bridged to the VM's network): the agent loads the NFS client modules,
mounts the root with busybox mount (string options: ``nolock,addr=``), switches into
it and reports active.

* read-write (``rw``): what the VE writes lands in the exported directory; the agent's
  own files (busybox, ``/run``) stay in RAM, not in the image;
* read-only with ``qrm.overlay=tmpfs`` (shared pools): the image stays pristine, the
  VE's writes go to the overlay in RAM;
* an export that does not exist: the agent reports ``failed`` with the server's
  answer, the resource is in error at once and, failover on, released.

The root arguments come as the VE's kernel arguments here (core has no NFS driver; the
``nfs`` plugin's ``describe_root`` produces the same ones, tested in its own boot test).
Needs root, qemu-system-x86, busybox-static, nfs-ganesha(-vfs), rpcbind and a Debian
kernel package (see conftest.py).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlab import Netns, QrmServerProcess, Udhcpd
from test_boot_qemu import CPUS, MEMORY_MB, VM, add_idle_image

from qrm_core.bootimage.builder import BuildResult
from qrm_core.models import ResourceState
from qrm_core.services import agent as agent_service
from qrm_core.services import boot, events, site, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import missing
from qrm_core.testkit import StorageHost, missing_storage_tools

SERVER_IP = "10.231.7.1"
STORAGE_IP = "10.231.7.35"
MAC = "52:54:00:51:0e:01"
VE_START = """#!/bin/sh
echo "started on $(cat /run/qrm/ip)" > /var/ve-started
echo "qrm-test-ve: root $(grep ' / ' /proc/mounts | head -n 1)" > /dev/console
"""


def root_tree(target: Path) -> Path:
    """A VE root: busybox and a start script that writes into the root."""
    for directory in ("bin", "etc/qrm", "proc", "sys", "dev", "run", "tmp", "var"):
        (target / directory).mkdir(parents=True, exist_ok=True)
    (target / "bin" / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (target / "bin" / "busybox").chmod(0o755)
    (target / "bin" / "sh").symlink_to("busybox")
    (target / "etc" / "qrm" / "ve-start").write_text(VE_START)
    (target / "etc" / "qrm" / "ve-start").chmod(0o755)
    (target / "etc" / "hostname").write_text("web\n")
    return target


def export_block(export_id: int, path: Path, access: str) -> str:
    return (
        f'EXPORT {{ Export_Id = {export_id}; Path = "{path}"; Pseudo = "{path}"; Access_Type = None;\n'
        "  Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; SecType = sys; FSAL { Name = VFS; }\n"
        f"  CLIENT {{ Clients = 10.231.7.0/24; Access_Type = {access}; Squash = No_Root_Squash; }} }}\n"
    )


@pytest.fixture(scope="module")
def nfs_lab(root_and_netns: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """The network, DHCP and the storage host (ganesha) for every test of this module."""
    if shutil.which("qemu-system-x86_64") is None:
        missing("QEMU", "apt-get install qemu-system-x86 ipxe-qemu")
    absent = missing_storage_tools("nsenter", "unshare", "rpcbind", "rpcinfo", "ganesha.nfsd")
    if absent:
        missing("nfs-ganesha", f"apt-get install {' '.join(absent)}")
    work = tmp_path_factory.mktemp("netroot")
    netns = Netns("nr")
    udhcpd = host = None
    try:
        netns.ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        netns.ip("addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        netns.ip("link", "set", "br0", "up")
        netns.ip("tuntap", "add", "dev", "tap0", "mode", "tap")
        netns.ip("link", "set", "tap0", "master", "br0")
        netns.ip("link", "set", "tap0", "up")
        udhcpd = Udhcpd(netns, "br0", work / "dhcp", "10.231.7.100", "10.231.7.150")
        exports = work / "exports"
        rw = root_tree(exports / "web")
        ro = root_tree(exports / "shared")
        (work / "ganesha-exports.conf").write_text(export_block(101, rw, "RW") + export_block(102, ro, "RO"))
        host = StorageHost("nrst", work / "storage", STORAGE_IP, bridge_netns=netns.name, bridge="br0")
        host.start_ganesha(work / "ganesha-exports.conf")
        yield netns, exports, host
    finally:
        if host is not None:
            host.stop()
        if udhcpd is not None:
            udhcpd.stop()
        netns.delete()


@pytest.fixture
def server(nfs_lab: tuple, boot_image: BuildResult, tmp_path: Path) -> Iterator[QrmServerProcess]:
    """A fresh qrm server per test: the boot image, a (fake) storage server, an image record."""
    netns, _, _ = nfs_lab
    server = QrmServerProcess(netns, SERVER_IP, 8080, tmp_path)
    try:
        with server.ctx() as ctx:
            add_idle_image(ctx, boot_image)
            storage.add_storage(ctx, name="st", type="fake", address=STORAGE_IP)
            storage.add_filesystem_image(ctx, name="web-root", storage="st", location="/exports/web")
        yield server
    finally:
        server.stop()


def boot_ve(netns: Netns, server: QrmServerProcess, kernel_args: str, log: Path, failover: bool = True) -> VM:
    """The machine known and idle, a VE with these root arguments placed on it, and the
    VM booted with the boot configuration the server then gives."""
    with server.ctx() as ctx:
        agent_service.register(ctx, mac=MAC, ip="10.231.7.120", cpus=CPUS, memory_mb=MEMORY_MB)
        ves.create_ve(
            ctx,
            name="web",
            boot_image="idle",
            fs_image="web-root",
            failover=failover,
            kernel_args=kernel_args,
        )
        ves.start_ve(ctx, "web")
    server.wait_resource(MAC, 15, "the VE's placement", lambda r: r.state == ResourceState.ASSIGNED.value)
    with server.ctx() as ctx:
        config = boot.boot_config(
            ctx, MAC, server_url=server.url, enrollment_token=site.get_enrollment_token(ctx)
        )
    assert config.mode == "ve" and kernel_args in config.cmdline
    return VM(netns, config, log)


def test_a_ve_boots_with_its_root_on_nfs_read_write(
    nfs_lab: tuple, server: QrmServerProcess, tmp_path: Path
) -> None:
    netns, exports, _ = nfs_lab
    image = exports / "web"
    args = f"root=/dev/nfs nfsroot={STORAGE_IP}:{image},vers=3,tcp rw"
    vm = boot_ve(netns, server, args, tmp_path / "console.log")
    try:
        row = server.wait_resource(MAC, 120, "the VE active", lambda r: r.state == ResourceState.ACTIVE.value)
        took = time.monotonic() - vm.started
        console = vm.console()
        assert f"mounting the VE root filesystem {STORAGE_IP}:{image} over NFS" in console
        assert f"qrm-test-ve: root {STORAGE_IP}:{image} / nfs rw," in console, console[-3000:]
        # What the VE wrote is on the server; what the agent brought lives in RAM only.
        assert (image / "var" / "ve-started").read_text() == f"started on {row.ip}\n"
        assert not (image / "qrm" / "bin").exists() and not (image / "run" / "qrm").exists()
    finally:
        vm.stop()
    print(f"NFS root (rw): power-on to VE active {took:.1f} s")


def test_a_shared_image_stays_pristine_below_an_overlay(
    nfs_lab: tuple, server: QrmServerProcess, tmp_path: Path
) -> None:
    netns, exports, _ = nfs_lab
    image = exports / "shared"
    args = f"root=/dev/nfs nfsroot={STORAGE_IP}:{image},vers=3,tcp ro qrm.overlay=tmpfs"
    vm = boot_ve(netns, server, args, tmp_path / "console.log")
    try:
        server.wait_resource(MAC, 120, "the VE active", lambda r: r.state == ResourceState.ACTIVE.value)
        console = vm.console()
        assert "the image is read-only below a writable layer in RAM (overlay)" in console
        assert "qrm-test-ve: root qrm-root / overlay rw," in console, console[-3000:]
        # ve-start wrote /var/ve-started, in the overlay: the image did not change.
        assert not (image / "var" / "ve-started").exists()
        assert sorted(p.name for p in image.iterdir()) == [
            "bin",
            "dev",
            "etc",
            "proc",
            "run",
            "sys",
            "tmp",
            "var",
        ]
    finally:
        vm.stop()


def test_a_root_that_cannot_be_mounted_is_reported_failed(
    nfs_lab: tuple, server: QrmServerProcess, tmp_path: Path
) -> None:
    netns, exports, _ = nfs_lab
    args = f"root=/dev/nfs nfsroot={STORAGE_IP}:{exports}/missing,vers=3,tcp rw"
    vm = boot_ve(netns, server, args, tmp_path / "console.log")
    try:
        server.wait_resource(MAC, 120, "the failure report", lambda r: r.state == ResourceState.ERROR.value)
        with server.ctx() as ctx:
            messages = [e.message for e in events.list_events(ctx, limit=50)]
        wanted = (
            "its agent reports failure: cannot mount the root filesystem of virtual environment web "
            f"(nfs {STORAGE_IP}:{exports}/missing: "
        )
        assert any(wanted in m for m in messages), messages
        # Failover: the VE gives the machine up and it is told to reboot (idle).
        vm.wait_exit(60, "reboot after its failure", server)
    finally:
        vm.stop()
    assert server.resource(MAC).ve_id is None or server.resource(MAC).state != ResourceState.ERROR.value


def test_a_ve_whose_storage_stops_answering_reports_failed_then_active(
    nfs_lab: tuple, server: QrmServerProcess, tmp_path: Path
) -> None:
    """The storage server freezes (SIGSTOP to ganesha) under a running VE: the agent, which
    runs from RAM, finds the root does not answer and reports failed with the reason
    (the resource is in error: the VE does not claim to run); ganesha resumes: active again."""
    import os
    import signal

    netns, exports, host = nfs_lab
    args = f"root=/dev/nfs nfsroot={STORAGE_IP}:{exports / 'shared'},vers=3,tcp ro qrm.overlay=tmpfs"
    vm = boot_ve(netns, server, args, tmp_path / "console.log", failover=False)
    ganesha = host.procs["ganesha"].pid
    try:
        server.wait_resource(MAC, 120, "the VE active", lambda r: r.state == ResourceState.ACTIVE.value)
        os.kill(ganesha, signal.SIGSTOP)
        try:
            server.wait_resource(
                MAC, 60, "the failure report", lambda r: r.state == ResourceState.ERROR.value
            )
            ve = server.wait(
                lambda ctx: (v := ves.show_ve(ctx, "web")).state == "degraded" and v, 15, "the VE degraded"
            )
            assert "stopped responding" in ve.problem
            with server.ctx() as ctx:
                messages = [e.message for e in events.list_events(ctx, limit=30)]
            wanted = f"its agent reports failure: the root filesystem (nfs {STORAGE_IP}:{exports}/shared) does not answer"
            assert any(wanted in m for m in messages), messages
        finally:
            os.kill(ganesha, signal.SIGCONT)
        server.wait_resource(MAC, 60, "the VE active again", lambda r: r.state == ResourceState.ACTIVE.value)
        assert "answers again" in vm.console()
    finally:
        os.kill(ganesha, signal.SIGCONT)
        vm.stop()
