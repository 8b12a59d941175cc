"""One machine's life, for real: a QEMU VM (TCG, virtio-net) boots the boot image qrm
built, its agent registers with the VM's real MAC, CPUs and memory with the real
``qrm server``; starting a virtual environment reboots it into the VE (root
filesystem archive unpacked into RAM, the VE's start script run, reported
active); stopping the VE makes it run the VE's stop script and reboot.

The VM boots with ``-kernel/-initrd/-append`` taken from
:func:`qrm_core.services.boot.boot_config` (what iPXE would be told; the
DHCP/TFTP/iPXE chain is tested by the boot plugins) and ``-no-reboot``, so
every reboot the server orders ends the QEMU process and the next boot gets
the then current boot configuration. Everything lives in one network
namespace: a bridge, the VM's tap, busybox udhcpd, the server and a small
HTTP server for the VE's root filesystem archive.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from agentlab import AgentPeer, Netns, QrmServerProcess, Udhcpd, stop_process

from qrm_core.bootimage.builder import BuildResult
from qrm_core.models import ResourceState, VEState
from qrm_core.services import agent as agent_service
from qrm_core.services import boot, boot_images, events, site, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import missing
from qrm_core.testkit import qemu_direct_boot

SERVER_IP = "10.231.1.1"
MAC = "52:54:00:51:0e:01"
MEMORY_MB = 256
CPUS = 2


def ve_root_archive() -> bytes:
    """A tiny VE root: no shell of its own (the agent brings busybox), a start and a stop script."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:

        def add(name: str, data: bytes | None = None, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        for directory in ("etc", "etc/qrm", "var", "tmp"):
            add(directory)
        add("etc/hostname", b"web\n", 0o644)
        add(
            "etc/qrm/ve-start",
            (
                "#!/bin/sh\n"
                "echo started > /var/ve-started\n"
                f"wget -q -O /dev/null http://{SERVER_IP}:8081/files/ve-started?from=$(cat /etc/hostname)\n"
            ).encode(),
        )
        add(
            "etc/qrm/ve-stop",
            f"#!/bin/sh\nwget -q -O /dev/null http://{SERVER_IP}:8081/files/ve-stopped\n".encode(),
        )
    return buffer.getvalue()


class VM:
    def __init__(self, netns: Netns, config: boot.BootConfig, log: Path, nic: str = "virtio-net-pci") -> None:
        self.log = log
        self._log = open(log, "wb")
        self.started = time.monotonic()
        self.proc = netns.popen(
            qemu_direct_boot(
                config.kernel_path,
                config.initrd_path,
                config.cmdline,
                MAC,
                memory_mb=MEMORY_MB,
                cpus=CPUS,
                nic=nic,
            ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_exit(self, timeout: float, why: str, server: QrmServerProcess) -> float:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            row = server.resource(MAC)
            with server.ctx() as ctx:
                shown = [f"{v.name} {v.state} ({v.problem or 'no problem'})" for v in ves.list_ves(ctx)]
                recent = [e.message for e in events.list_events(ctx, limit=15)]
            raise AssertionError(
                f"the VM did not {why} within {timeout} s; resource {row.state} gen {row.boot_generation}, "
                f"VEs {shown}; events {recent}\n"
                f"server log: {server.log_path.read_text()[-1500:]}\nconsole: {self.console()[-2000:]}"
            ) from None
        return time.monotonic() - self.started

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def add_idle_image(ctx, boot_image: BuildResult) -> None:
    """The boot image under test as the default (idle) image, console on the serial port."""
    boot_images.add_boot_image(
        ctx,
        name="idle",
        kernel_version=boot_image.kernel_version,
        kernel=boot_image.kernel,
        initrd=boot_image.initrd,
        cmdline="console=ttyS0,115200n8 panic=-1",
        make_default=True,
    )


def ve_state(server: QrmServerProcess, wanted: str, timeout: float) -> None:
    """Wait for the engine (it runs in the server, once a second) to bring the VE to ``wanted``."""
    deadline = time.monotonic() + timeout
    while True:
        with server.ctx() as ctx:
            state = ves.show_ve(ctx, "web").state
        if state == wanted:
            return
        assert time.monotonic() < deadline, f"VE web is {state}, not {wanted}"
        time.sleep(0.2)


@pytest.fixture
def vm_lab(root_and_netns: None, tmp_path: Path):
    if shutil.which("qemu-system-x86_64") is None:
        missing("QEMU", "apt-get install qemu-system-x86 ipxe-qemu")
    netns = Netns("vm")
    udhcpd = server = files = None
    try:
        netns.ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        netns.ip("addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        netns.ip("link", "set", "br0", "up")
        netns.ip("tuntap", "add", "dev", "tap0", "mode", "tap")
        netns.ip("link", "set", "tap0", "master", "br0")
        netns.ip("link", "set", "tap0", "up")
        udhcpd = Udhcpd(netns, "br0", tmp_path / "dhcp", "10.231.1.100", "10.231.1.150")
        server = QrmServerProcess(netns, SERVER_IP, 8080, tmp_path)
        files = AgentPeer("unused")
        files.files = {"web.tar.gz": ve_root_archive(), "ve-started": b"ok", "ve-stopped": b"ok"}
        files.serve(netns.listen(SERVER_IP, 8081))
        yield netns, server, files
    finally:
        if files is not None:
            files.stop()
        if server is not None:
            server.stop()
        if udhcpd is not None:
            udhcpd.stop()
        netns.delete()


def test_vm_registers_then_runs_a_ve_in_ram(vm_lab, boot_image: BuildResult, tmp_path: Path) -> None:
    netns, server, files = vm_lab
    timings: dict[str, float] = {}
    with server.ctx() as ctx:
        add_idle_image(ctx, boot_image)
        token = site.get_enrollment_token(ctx)
        config = boot.boot_config(ctx, MAC, server_url=server.url, enrollment_token=token)
    assert config.mode == "idle"

    # Power on: the idle boot image registers the machine as it is.
    vm = VM(netns, config, tmp_path / "console-idle.log")
    try:
        row = server.wait_resource(MAC, 90, "registration", lambda r: r.state == ResourceState.IDLE.value)
        timings["power-on to registered"] = time.monotonic() - vm.started
        assert (row.cpus, row.memory_mb, row.kind) == (CPUS, MEMORY_MB, "physical")
        assert row.ip is not None and row.ip.startswith("10.231.1.")
        console = vm.console()
        assert "loaded module virtio_net" in console and "Kernel panic" not in console

        # Start a VE: the engine assigns the idle machine and orders the reboot.
        with server.ctx() as ctx:
            storage.add_storage(ctx, name="st", type="fake", address="10.231.1.2")
            storage.add_filesystem_image(ctx, name="web-root", storage="st", location="/exports/web")
            ves.create_ve(
                ctx,
                name="web",
                boot_image="idle",
                fs_image="web-root",
                kernel_args=f"qrm.rootfs=http://{SERVER_IP}:8081/files/web.tar.gz",
            )
            ves.start_ve(ctx, "web")
        vm.wait_exit(60, "reboot for the VE", server)
    finally:
        vm.stop()
    row = server.resource(MAC)
    assert row.state == ResourceState.ASSIGNED.value and row.boot_generation == 1

    with server.ctx() as ctx:
        config = boot.boot_config(ctx, MAC, server_url=server.url, enrollment_token=token)
    assert config.mode == "ve" and "qrm.ve=web" in config.cmdline and "qrm.gen=1" in config.cmdline

    # The VE boot: root archive into RAM, switch_root, ve-start, active.
    vm = VM(netns, config, tmp_path / "console-ve.log")
    try:
        server.wait_resource(MAC, 90, "the VE to be active", lambda r: r.state == ResourceState.ACTIVE.value)
        timings["power-on to VE active"] = time.monotonic() - vm.started
        ve_state(server, VEState.RUNNING.value, 15)
        fetched = files.hits("/files/web.tar.gz")
        assert fetched and fetched[0].client == server.resource(MAC).ip
        assert files.hits("/files/ve-started?from=web")
        console = vm.console()
        assert "switching to the VE root filesystem (web)" in console
        assert "continuing in the VE root" in console

        # Stop the VE: the machine runs ve-stop and reboots out of it.
        with server.ctx() as ctx:
            ves.stop_ve(ctx, "web")
        vm.wait_exit(60, "reboot out of the VE", server)
        assert files.hits("/files/ve-stopped")
    finally:
        vm.stop()
    # The server released nothing yet: it does that when the machine registers idle
    # again (services.virtual_environments.stop_ve), which is the next boot's business.
    row = server.resource(MAC)
    assert row.boot_generation == 2
    ve_state(server, VEState.STOPPING.value, 5)
    print("timings:", {k: round(v, 1) for k, v in timings.items()})


def test_an_e1000_machine_registers_and_obeys_halt(vm_lab, boot_image: BuildResult, tmp_path: Path) -> None:
    """Another NIC (its driver found by the device's PCI alias), and a real power-off."""
    netns, server, _ = vm_lab
    with server.ctx() as ctx:
        add_idle_image(ctx, boot_image)
        config = boot.boot_config(
            ctx, MAC, server_url=server.url, enrollment_token=site.get_enrollment_token(ctx)
        )
    vm = VM(netns, config, tmp_path / "console-e1000.log", nic="e1000")
    try:
        row = server.wait_resource(MAC, 90, "registration", lambda r: r.state == ResourceState.IDLE.value)
        registered = time.monotonic() - vm.started
        assert (row.cpus, row.memory_mb) == (CPUS, MEMORY_MB)
        console = vm.console()
        assert "loaded module e1000" in console and "loaded module virtio_net" not in console
        with server.ctx() as ctx:
            agent_service.order_halt(ctx, MAC)
        vm.wait_exit(30, "power off", server)
    finally:
        vm.stop()
    assert vm.proc.returncode == 0 and "the server commands: halt" in vm.console()
    assert server.resource(MAC).state == ResourceState.OFF.value
    print(f"e1000: power-on to registered {registered:.1f} s")


def test_a_ve_whose_root_cannot_be_fetched_is_reported_failed(
    vm_lab, boot_image: BuildResult, tmp_path: Path
) -> None:
    """The agent cannot fetch the VE's root filesystem (HTTP 404): it says so
    (heartbeat state "failed" with the reason) and the resource is in error
    at once, long before the boot timeout; with failover on, the VE leaves it
    and the machine is told to reboot."""
    netns, server, _ = vm_lab
    with server.ctx() as ctx:
        add_idle_image(ctx, boot_image)
        token = site.get_enrollment_token(ctx)
        # The machine is known and idle (as after its first boot), then a VE is placed on it.
        agent_service.register(ctx, mac=MAC, ip="10.231.1.120", cpus=CPUS, memory_mb=MEMORY_MB)
        storage.add_storage(ctx, name="st", type="fake", address="10.231.1.2")
        storage.add_filesystem_image(ctx, name="web-root", storage="st", location="/exports/web")
        ves.create_ve(
            ctx,
            name="web",
            boot_image="idle",
            fs_image="web-root",
            failover=True,
            kernel_args=f"qrm.rootfs=http://{SERVER_IP}:8081/files/missing.tar.gz",
        )
        ves.start_ve(ctx, "web")
    server.wait_resource(MAC, 15, "the VE's placement", lambda r: r.state == ResourceState.ASSIGNED.value)
    with server.ctx() as ctx:
        config = boot.boot_config(ctx, MAC, server_url=server.url, enrollment_token=token)
    assert config.mode == "ve"

    vm = VM(netns, config, tmp_path / "console-ve.log")
    try:
        server.wait_resource(MAC, 90, "the failure report", lambda r: r.state == ResourceState.ERROR.value)
        took = time.monotonic() - vm.started
        with server.ctx() as ctx:
            messages = [e.message for e in events.list_events(ctx, limit=50)]
        assert any(
            "its agent reports failure: cannot fetch the root filesystem of virtual environment web (HTTP 404)"
            in m
            for m in messages
        ), messages
        console = vm.console()
        assert "reporting failure to the server" in console
        # The VE gives the machine up (failover) and the machine is told to reboot.
        vm.wait_exit(60, "reboot after its failure", server)
    finally:
        vm.stop()
    assert took < 60, f"the failure took {took:.0f} s to reach the server"
    row = server.resource(MAC)
    assert row.ve_id is None
