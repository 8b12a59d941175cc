"""A small TFTP client for the tests (asyncio, real UDP), independent of the server's code.

It speaks RFC 1350 with the blksize/tsize/timeout options, pins the server's
transfer port from the first answer, acknowledges each block and resends on
timeout - enough to drive hundreds of concurrent transfers from one process
and to send deliberately broken packets.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field


class TftpFailure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"TFTP error {code}: {message}")
        self.code = code
        self.message = message


def rrq(
    name: str | bytes, mode: str = "octet", options: dict[str, str] | None = None, opcode: int = 1
) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    packet = struct.pack("!H", opcode) + raw + b"\0" + mode.encode() + b"\0"
    for key, value in (options or {}).items():
        packet += key.encode() + b"\0" + value.encode() + b"\0"
    return packet


def parse_error(packet: bytes) -> tuple[int, str] | None:
    if len(packet) >= 4 and packet[:2] == b"\0\5":
        return struct.unpack("!H", packet[2:4])[0], packet[4:].rstrip(b"\0").decode("ascii", "replace")
    return None


@dataclass
class Result:
    data: bytes
    options: dict[str, str] = field(default_factory=dict)
    server_port: int = 0


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        pass


async def fetch(
    host: str,
    port: int,
    name: str | bytes,
    *,
    mode: str = "octet",
    options: dict[str, str] | None = None,
    timeout: float = 2.0,
    retries: int = 5,
    stop_after_blocks: int | None = None,
) -> Result:
    """Download ``name``; with ``stop_after_blocks`` vanish after that many blocks (no ERROR sent)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Protocol, local_addr=("127.0.0.1", 0))
    try:
        server: tuple[str, int] | None = None
        last = rrq(name, mode, options)
        transport.sendto(last, (host, port))
        expected = 1
        blksize = 512
        chunks: list[bytes] = []
        granted: dict[str, str] = {}
        tries = 0
        while True:
            try:
                data, addr = await asyncio.wait_for(proto.queue.get(), timeout)
            except TimeoutError:
                tries += 1
                if tries > retries:
                    raise TimeoutError(f"no answer for {name!r}") from None
                transport.sendto(last, server or (host, port))
                continue
            if server is None:
                server = addr
            elif addr != server:
                continue
            error = parse_error(data)
            if error is not None:
                raise TftpFailure(*error)
            opcode, block = struct.unpack("!HH", data[:4])
            if opcode == 6 and expected == 1 and not chunks:
                parts = data[2:].split(b"\0")[:-1]
                granted = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)}
                blksize = int(granted.get("blksize", 512))
                last = struct.pack("!HH", 4, 0)
                transport.sendto(last, server)
                tries = 0
                continue
            if opcode != 3:
                raise AssertionError(f"unexpected opcode {opcode}")
            if block == expected & 0xFFFF:
                chunks.append(data[4:])
                last = struct.pack("!HH", 4, block)
                if stop_after_blocks is not None and len(chunks) >= stop_after_blocks:
                    return Result(b"".join(chunks), granted, server[1])
                transport.sendto(last, server)
                tries = 0
                expected += 1
                if len(data) - 4 < blksize:
                    payload = b"".join(chunks)
                    if mode == "netascii":
                        payload = payload.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")
                    return Result(payload, granted, server[1])
            # an old block again: our ACK was lost; the server resends, we wait
    finally:
        transport.close()


def fetch_sync(host: str, port: int, name: str | bytes, **kwargs) -> Result:
    return asyncio.run(fetch(host, port, name, **kwargs))


def exchange(
    port: int, packet: bytes, timeout: float = 2.0, host: str = "127.0.0.1"
) -> tuple[bytes, int] | None:
    """Send one raw packet to the server; the first answer and the port it came from (or None)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(timeout)
        sock.sendto(packet, (host, port))
        try:
            data, addr = sock.recvfrom(70000)
        except TimeoutError:
            return None
        return data, addr[1]
