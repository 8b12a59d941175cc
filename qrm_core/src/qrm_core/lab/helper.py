"""The lab's helper process: the way in from this machine, and IPv6 router advertisements.

``qrm lab up`` starts it once, tracked by PID like everything else, as
``python -m qrm_core.lab.helper``. It does two small jobs that need no
address outside the lab's network namespace:

* **The way in.** ``qrm lab up`` binds a TCP socket on ``127.0.0.1:PORT`` in
  this machine's own namespace (loopback only, no new address) and hands it
  over as an inherited file descriptor. The helper then moves itself into the
  lab's namespace (``setns``) and, for every connection accepted there, opens
  one to ``qrm server`` inside (``10.77.0.1:8080``) and copies bytes both ways.
  So ``qrm --server http://127.0.0.1:PORT ...`` reaches the lab's server from
  the root namespace, and nothing in the root namespace changes.
* **Router advertisements.** QEMU's iPXE ROM waits about 16 s for an IPv6
  router advertisement before it boots (docs/netboot.md, "Traps"). The helper
  answers every router solicitation on the lab's bridge at once, and repeats
  an unsolicited advertisement every few seconds: router lifetime 0 (not a
  default router), no prefix, no DHCPv6 flags - "there is a router here and it
  offers nothing", which is all iPXE waits for. It is sent from the bridge's
  link-local address; the lab adds no IPv6 address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import socket
import struct
import sys
import time

log = logging.getLogger("qrm.lab.helper")

CLONE_NEWNET = 0x40000000
ICMPV6_ROUTER_SOLICIT = 133
ICMPV6_ROUTER_ADVERT = 134
ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"
#: Seconds between unsolicited advertisements (RFC 4861 allows 3 s minimum for MaxRtrAdvInterval's floor).
ADVERT_INTERVAL = 4.0


def enter_netns(name: str) -> None:
    """Move the calling thread (call it before any other thread exists: the whole process) into ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def router_advertisement(mac: bytes) -> bytes:
    """An RA: hop limit 64, no flags, router lifetime 0, no timers, source link-layer address.

    The checksum is left 0: the kernel fills it in for raw ICMPv6 sockets.
    """
    header = struct.pack("!BBHBBHII", ICMPV6_ROUTER_ADVERT, 0, 0, 64, 0, 0, 0, 0)
    source_lladdr = struct.pack("!BB", 1, 1) + mac
    return header + source_lladdr


SIOCGIFHWADDR = 0x8927


def interface_mac(sock: socket.socket, name: str) -> bytes:
    """The interface's MAC, asked through a socket of its namespace (``/sys`` may show another one)."""
    answer = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, struct.pack("256s", name.encode()[:15]))
    return answer[18:24]


class Advertiser:
    """Answers router solicitations on one interface (see the module docstring)."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.index = socket.if_nametoindex(interface)
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.index)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        group = socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("@I", self.index)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group)
        self._last = 0.0
        self.sent = 0

    def send(self) -> None:
        try:
            packet = router_advertisement(interface_mac(self.sock, self.interface))
            self.sock.sendto(packet, (ALL_NODES, 0, 0, self.index))
            self.sent += 1
        except OSError as exc:  # no link-local address yet, interface going away
            log.debug("router advertisement not sent: %s", exc)
        self._last = time.monotonic()

    def readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("icmpv6 receive failed: %s", exc)
                return
            # A burst of solicitations (several VMs at once) gets one answer.
            if data[:1] == bytes([ICMPV6_ROUTER_SOLICIT]) and time.monotonic() - self._last > 0.2:
                self.send()
                log.info("answered a router solicitation on %s", self.interface)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self.readable)
        while True:
            self.send()
            await asyncio.sleep(ADVERT_INTERVAL)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


async def _forward(
    target: tuple[str, int], client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
) -> None:
    try:
        server_reader, server_writer = await asyncio.wait_for(asyncio.open_connection(*target), 10)
    except (OSError, TimeoutError):
        client_writer.close()
        return
    try:
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))
    finally:
        for writer in (client_writer, server_writer):
            with contextlib.suppress(Exception):
                writer.close()


async def serve(listen_fd: int | None, target: tuple[str, int], ra_interface: str | None) -> None:
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    server = None
    if listen_fd is not None:
        listener = socket.socket(fileno=listen_fd)
        listener.setblocking(False)
        server = await asyncio.start_server(lambda r, w: _forward(target, r, w), sock=listener, limit=1 << 20)
    if ra_interface:
        tasks.append(asyncio.create_task(Advertiser(ra_interface).run()))
    await stop.wait()
    for task in tasks:
        task.cancel()
    if server is not None:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qrm_core.lab.helper", description=__doc__.split("\n")[0])
    parser.add_argument("--netns", required=True, help="the lab's network namespace")
    parser.add_argument("--listen-fd", type=int, help="inherited listening socket (root namespace)")
    parser.add_argument("--target", default="10.77.0.1:8080", help="qrm server inside the namespace")
    parser.add_argument("--ra-interface", help="send router advertisements on this interface")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, _, port = args.target.rpartition(":")
    # Before any thread exists: every thread made later (asyncio's resolver too) lives in the lab.
    enter_netns(args.netns)
    log.info(
        "forwarding fd %s to %s; router advertisements on %s", args.listen_fd, args.target, args.ra_interface
    )
    asyncio.run(serve(args.listen_fd, (host, int(port)), args.ra_interface))
    return 0


if __name__ == "__main__":
    sys.exit(main())
