"""The hot paths made cheaper after bench/server (docs/benchmarks.md, Server)
must do exactly what the general code does: the server's socket, the access
log, and the node-agent registration (SQLite, PostgreSQL, MariaDB)."""

import asyncio
import logging
import socket

import httpx
import sqlalchemy as sa
from sqlmodel import select

from qrm_core.models import Event, Resource
from qrm_core.server import bind_socket
from qrm_core.services import agent, resources, service_context


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


def _register(settings, plugins, mac: str, **kwargs):
    with service_context(settings, actor="agent", plugins=plugins) as ctx:
        return agent.register(ctx, mac=mac, ip="198.18.0.7", cpus=2, memory_mb=2048, **kwargs)


def _row(settings, plugins, rid: int) -> Resource:
    with service_context(settings, plugins=plugins) as ctx:
        row = ctx.session.get(Resource, rid)
        assert row is not None
        return row


def test_a_new_machine_is_inserted_in_its_state_with_both_events(qrm_settings, qrm_plugins) -> None:
    """One INSERT of the resource, no UPDATE; the two events in their order."""
    from qrm_core.db import get_engine

    statements: list[str] = []

    def seen(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    engine = get_engine(qrm_settings)
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        reg = _register(qrm_settings, qrm_plugins, "02:51:00:00:00:05", hostname="web1")
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    assert "UPDATE" not in statements
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        shown = resources.show_resource(ctx, reg.resource_id)
        messages = [e.message for e in ctx.session.exec(select(Event).order_by(Event.id)).all()]
    assert (shown.state, shown.hostname, shown.kind) == ("idle", "web1", "physical")
    assert messages[-2:] == [
        "resource 02:51:00:00:00:05 registered (physical)",
        "resource web1 new -> idle: registered",
    ]
