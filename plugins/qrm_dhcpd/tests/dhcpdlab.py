"""Helpers for the DHCP tests: a private two-namespace wire, a busybox DHCP client, the plugin's settings.

Network rule: every address lives on a veth pair between two namespaces the
tests create (``qd<pid><n>s`` server side, ``qd<pid><n>c`` client side) and
delete afterwards, even when a test fails. Nothing is added to the root
namespace. Every process is started with Popen and stopped by its PID.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from qrm_core.config import Settings
from qrm_core.models import Event
from qrm_core.testing import missing
from qrm_core.testkit import Netns
from qrm_dhcpd.service import ManagedDhcpServer
from qrm_dhcpd.settings import load_settings

SERVER_IP = "10.99.0.1"
SUBNET = "10.99.0.0/24"
POOL = ("10.99.0.100", "10.99.0.150")
_counter = itertools.count()

UDHCPC_HOOK = """#!/bin/sh
# Records what the server offered; configures nothing.
[ "$1" = bound ] && env > "$QRM_TEST_OFFER"
exit 0
"""


def need(program: str, package: str) -> str:
    path = shutil.which(program) or (
        f"/usr/sbin/{program}" if Path(f"/usr/sbin/{program}").exists() else None
    )
    if path is None:
        missing(program, f"install the Debian package {package} (scripts/system-packages.sh test)")
    assert path is not None
    return path


def need_root_netns() -> None:
    if os.geteuid() != 0:
        missing("network namespaces", "the DHCP tests run as root (ip netns, raw sockets)")
    need("ip", "iproute2")


@dataclass
class Offer:
    """What udhcpc was offered: the environment its hook script saw."""

    env: dict[str, str]

    @property
    def ip(self) -> str | None:
        return self.env.get("ip")

    @property
    def siaddr(self) -> str | None:
        return self.env.get("siaddr")

    @property
    def boot_file(self) -> str | None:
        return self.env.get("boot_file")

    @property
    def hostname(self) -> str | None:
        return self.env.get("hostname")

    def opt(self, code: int) -> str | None:
        return self.env.get(f"opt{code}")


class Wire:
    """Two namespaces joined by a veth pair; the client side runs busybox udhcpc."""

    def __init__(self, tmp: Path) -> None:
        n = next(_counter)
        self.tag = f"d{n}"
        tag = f"{os.getpid() % 100000}{n}"
        self.server_if = f"qd{tag}S"[:15]
        self.client_if = f"qd{tag}C"[:15]
        self.server: Netns | None = None
        self.client: Netns | None = None
        self.tmp = tmp
        self.hook = tmp / "udhcpc-hook.sh"
        self.hook.write_text(UDHCPC_HOOK)
        self.hook.chmod(0o755)
        self.busybox = need("busybox", "busybox-static")

    @property
    def server_ns(self) -> str:
        assert self.server is not None, "the wire is not up"
        return self.server.name

    @property
    def client_ns(self) -> str:
        assert self.client is not None, "the wire is not up"
        return self.client.name

    def up(self) -> Wire:
        self.server = Netns(f"{self.tag}s")
        self.client = Netns(f"{self.tag}c")
        self.server.ip(
            "link", "add", self.server_if, "type", "veth", "peer", "name", self.client_if,
            "netns", self.client.name,
        )  # fmt: skip
        self.server.ip("addr", "add", f"{SERVER_IP}/24", "dev", self.server_if)
        self.server.ip("link", "set", self.server_if, "up")
        self.client.ip("link", "set", self.client_if, "up")
        return self

    def down(self) -> None:
        for ns in (self.server, self.client):
            if ns is not None:
                ns.delete()

    def dhcp(
        self,
        mac: str,
        *,
        vendor: str | None = "PXEClient",
        arch: int | None = None,
        ipxe: bool = False,
        hostname: str | None = None,
        request: tuple[str, ...] = ("hostname",),
        tries: int = 3,
    ) -> Offer | None:
        """One DHCP exchange from ``mac``; the offer, or None if no server answered."""
        assert self.client is not None
        self.client.ip("link", "set", self.client_if, "address", mac)
        self.client.ip("addr", "flush", "dev", self.client_if)
        out = self.tmp / "offer.env"
        out.unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", self.client_ns, self.busybox, "udhcpc", "-i", self.client_if]
        argv += ["-f", "-q", "-n", "-t", str(tries), "-T", "1", "-A", "1", "-s", str(self.hook)]
        if vendor:
            argv += ["-V", vendor]
        if arch is not None:
            argv += ["-x", f"0x5d:{arch:04x}"]
        if ipxe:
            argv += ["-x", "0x4d:" + b"iPXE".hex()]
        if hostname is not None:
            argv += ["-x", "0x0c:" + hostname.encode().hex()]
        for opt in request:
            argv += ["-O", opt]
        env = dict(os.environ, QRM_TEST_OFFER=str(out))
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        if proc.returncode != 0 or not out.exists():
            return None
        values = {}
        for line in out.read_text().splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return Offer(values)


def dhcpd_env(
    monkeypatch: pytest.MonkeyPatch,
    *,
    backend: str,
    interface: str = "eth-qrm",
    netns: str | None = None,
    socket_dir: Path | None = None,
    **extra: Any,
) -> None:
    """Configure the plugin through its environment variables, as a user would."""
    values = {
        "BACKEND": backend,
        "INTERFACE": interface,
        "SUBNET": SUBNET,
        "POOL_START": POOL[0],
        "POOL_END": POOL[1],
        "ROUTER": SERVER_IP,
        "DNS_SERVERS": SERVER_IP,
        "DOMAIN": "lab.example",
        "NEXT_SERVER": SERVER_IP,
        "LEASE_TIME": "600",
        "TIMEOUT": "15",
    }
    if netns:
        values["NETNS"] = netns
    if socket_dir is not None:
        values["KEA_CONTROL_SOCKET"] = str(socket_dir / "kea4.sock")
    values.update({k.upper(): str(v) for k, v in extra.items()})
    for key, value in values.items():
        monkeypatch.setenv(f"QRM_DHCPD_{key}", value)


@contextmanager
def running(
    backend: str, wire: Wire, socket_dir: Path, monkeypatch: pytest.MonkeyPatch, core: Settings, **extra: str
) -> Iterator[ManagedDhcpServer]:
    """The plugin's managed server for ``backend``, in the wire's server namespace; stopped by PID."""
    dhcpd_env(
        monkeypatch,
        backend=backend,
        interface=wire.server_if,
        netns=wire.server_ns,
        socket_dir=socket_dir,
        **extra,
    )
    managed = ManagedDhcpServer(load_settings(), core)
    managed.start()
    try:
        yield managed
    finally:
        managed.stop()


def error_events(ctx) -> list[str]:  # type: ignore[no-untyped-def]
    """The messages of the error events recorded so far (the plugin records its failures as such)."""
    ctx.session.expire_all()
    return [e.message for e in ctx.session.exec(select(Event).where(Event.level == "error")).all()]


class Bridge:
    """One namespace with a bridge (the DHCP server's side) and a tap for a QEMU guest."""

    def __init__(self) -> None:
        self.tag = f"b{next(_counter)}"
        self.netns: Netns | None = None
        self.bridge = "br0"
        self.tap = "tap0"

    @property
    def ns(self) -> str:
        assert self.netns is not None, "the bridge is not up"
        return self.netns.name

    def up(self) -> Bridge:
        self.netns = ns = Netns(self.tag)
        # forward_delay 0: otherwise the new port drops the server's replies for seconds
        ns.ip("link", "add", self.bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        ns.ip("addr", "add", f"{SERVER_IP}/24", "dev", self.bridge)
        ns.ip("tuntap", "add", "dev", self.tap, "mode", "tap")
        ns.ip("link", "set", self.tap, "master", self.bridge)
        for ifname in (self.bridge, self.tap):
            ns.ip("link", "set", ifname, "up")
        return self

    def down(self) -> None:
        if self.netns is not None:
            self.netns.delete()


@dataclass
class Reply:
    """A DHCP reply seen on the wire."""

    message_type: int
    yiaddr: str
    siaddr: str
    file: str
    options: dict[int, bytes]


def parse_reply(frame: bytes) -> Reply | None:
    """A BOOTP reply (UDP 67 -> 68) in an Ethernet frame, or None."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00" or frame[14 + 9] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp = 14 + ihl
    if (
        int.from_bytes(frame[udp : udp + 2], "big") != 67
        or int.from_bytes(frame[udp + 2 : udp + 4], "big") != 68
    ):
        return None
    bootp = frame[udp + 8 :]
    if bootp[0] != 2 or bootp[236:240] != b"\x63\x82\x53\x63":
        return None
    options: dict[int, bytes] = {}
    i = 240
    while i < len(bootp) and bootp[i] != 255:
        if bootp[i] == 0:
            i += 1
            continue
        code, length = bootp[i], bootp[i + 1]
        options[code] = bootp[i + 2 : i + 2 + length]
        i += 2 + length
    return Reply(
        message_type=options.get(53, b"\x00")[0],
        yiaddr=".".join(str(b) for b in bootp[16:20]),
        siaddr=".".join(str(b) for b in bootp[20:24]),
        file=bootp[108:236].split(b"\x00", 1)[0].decode(errors="replace"),
        options=options,
    )


class Threads:
    """Calls in threads of their own; their answers and errors by key."""

    def __init__(self, timeout: float = 90.0) -> None:
        self.timeout = timeout
        self.threads: list[threading.Thread] = []
        self.answers: dict[Any, Any] = {}
        self.errors: dict[Any, BaseException] = {}

    def start(self, key: Any, call: Callable[[], Any]) -> None:
        def body() -> None:
            try:
                self.answers[key] = call()
            except BaseException as exc:
                self.errors[key] = exc

        thread = threading.Thread(target=body, name=f"call-{key}")
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(self.timeout)
            assert not thread.is_alive(), f"{thread.name} did not return"
