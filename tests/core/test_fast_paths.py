"""The hot paths made cheaper after bench/server (docs/benchmarks.md, Server)
must do exactly what the general code does."""

import asyncio
import socket

from qrm_core.server import bind_socket


def test_bind_socket_connections_send_without_delay() -> None:
    """Replies go out at once (TCP_NODELAY), not after the client's delayed ACK."""
    sock = bind_socket("127.0.0.1", 0)
    flags: list[int] = []

    async def main() -> None:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            flags.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            await asyncio.sleep(0.1)
            writer.close()

    asyncio.run(main())
    assert flags and flags[0] != 0
