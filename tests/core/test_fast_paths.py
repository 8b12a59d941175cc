"""The hot paths made cheaper after bench/server (docs/benchmarks.md, Server)
must do exactly what the general code does: the server's socket and the
access log."""

import asyncio
import logging
import socket

import httpx

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


def test_api_requests_are_logged_agent_requests_are_not(qrm_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="qrm.api")
    with qrm_server.client() as client:
        assert client.get("/api/v1/resources").status_code == 200
        answer = httpx.post(
            qrm_server.url + "/agent/v1/heartbeat",
            json={"resource_id": 1, "state": "idle"},
            timeout=10,
        )
        assert answer.status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "qrm.api"]
    assert any(line.startswith("GET /api/v1/resources 200 ") and line.endswith("ms") for line in lines)
    assert not any("/agent/" in line for line in lines)
