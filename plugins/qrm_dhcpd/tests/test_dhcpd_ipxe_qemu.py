"""A real iPXE (QEMU's virtio-net ROM from ipxe-qemu) asks Kea and ISC dhcpd for its address.

busybox udhcpc only imitates a PXE client (vendor class, user-class,
architecture). This test lets the firmware itself ask: QEMU (TCG) boots from
the network on a tap in a namespace the test creates, the plugin's managed
server answers on the bridge, and a packet socket on that bridge records the
replies. Nothing serves TFTP, so the guest never gets further than DHCP; the
test stops QEMU by its PID once the ACK has been seen.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dhcpdlab import SERVER_IP, Bridge, Reply, dhcpd_env, need, need_root_netns, parse_reply

from qrm_core.config import Settings
from qrm_dhcpd.service import ManagedDhcpServer
from qrm_dhcpd.settings import load_settings
from qrm_dhcpd.system import run_in_netns

pytestmark = pytest.mark.netns

GUEST_MAC = "52:54:00:aa:00:01"
ETH_P_ALL = 0x0003
DHCPACK = 5


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    need_root_netns()
    b = Bridge()
    try:
        b.up()
        yield b
    finally:
        b.down()


@pytest.mark.parametrize("backend", ["kea", "isc"])
def test_qemu_ipxe_gets_boot_ipxe_and_no_pxedhcp(
    backend: str,
    bridge: Bridge,
    short_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    qrm_settings: Settings,
    request: pytest.FixtureRequest,
) -> None:
    request.getfixturevalue("kea_bin" if backend == "kea" else "dhcpd_bin")
    qemu = need("qemu-system-x86_64", "qemu-system-x86")
    if not Path("/usr/lib/ipxe/qemu/efi-virtio.rom").exists():
        need("efi-virtio.rom", "ipxe-qemu")
    dhcpd_env(
        monkeypatch,
        backend=backend,
        interface=bridge.bridge,
        netns=bridge.ns,
        socket_dir=short_dir,
        isc_ping_check="false",
    )
    managed = ManagedDhcpServer(load_settings(), qrm_settings)
    managed.start()

    def capture() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((bridge.bridge, 0))
        return sock

    sniffer = run_in_netns(bridge.ns, capture)
    sniffer.settimeout(0.5)
    guest = None
    replies: list[Reply] = []
    try:
        guest = subprocess.Popen(
            ["ip", "netns", "exec", bridge.ns, qemu, "-accel", "tcg", "-m", "128", "-display", "none",
             "-boot", "n", "-no-reboot", "-netdev", f"tap,id=n0,ifname={bridge.tap},script=no,downscript=no",
             "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(tmp_path / "qemu.log").open("wb"),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(r.message_type == DHCPACK for r in replies):
            try:
                frame = sniffer.recv(65536)
            except TimeoutError:
                assert guest.poll() is None, (tmp_path / "qemu.log").read_text()[-500:]
                continue
            reply = parse_reply(frame)
            if reply is not None:
                replies.append(reply)
    finally:
        sniffer.close()
        if guest is not None:
            guest.terminate()
            try:
                guest.wait(timeout=10)
            except subprocess.TimeoutExpired:
                guest.kill()
                guest.wait()
        managed.stop()
    acks = [r for r in replies if r.message_type == DHCPACK]
    assert acks, f"no DHCPACK seen; replies: {replies}"
    ack = acks[0]
    assert ack.siaddr == SERVER_IP and ack.file == "boot.ipxe"
    assert ack.yiaddr.startswith("10.99.0.")
    # option 175 holding sub-option 176 (no-pxedhcp), length 1, value 1
    assert ack.options.get(175) == bytes([176, 1, 1])
