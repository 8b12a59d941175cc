"""The hot paths made cheaper after bench/server (docs/benchmarks.md, Server)
must do exactly what the general code does: the server's socket, the access
log, and the node-agent registration and heartbeat (SQLite, PostgreSQL,
MariaDB)."""

import asyncio
import itertools
import logging
import socket

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import select

from qrm_core.errors import AuthError
from qrm_core.models import Event, Resource, ResourceState, VEDesiredState, VirtualEnvironment
from qrm_core.server import bind_socket
from qrm_core.services import agent, boot_images, resources, service_context, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.services.agent import _apply_heartbeat, heartbeat_changes_nothing


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
            qrm_server.url + "/agent/v1/heartbeat", json={"resource_id": 1, "state": "idle"}, timeout=10
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


def _heartbeat(settings, plugins, rid: int, token: str | None, **kwargs):
    with service_context(settings, actor="agent", plugins=plugins) as ctx:
        return agent.heartbeat(ctx, resource_id=rid, token=token, **kwargs)


@pytest.fixture
def ve_ids(qrm_ctx):
    """A running and a stopped VE (ids)."""
    storage.add_storage(qrm_ctx, name="st", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="root", storage="st", location="/exports/root")
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")
    ves.create_ve(qrm_ctx, name="up", boot_image="idle", fs_image="root")
    ves.create_ve(qrm_ctx, name="down", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "up")
    rows = qrm_ctx.session.exec(select(VirtualEnvironment)).all()
    return {row.name: row.id for row in rows}


def test_the_quiet_heartbeat_rule_agrees_with_the_full_one(qrm_ctx, ve_ids) -> None:
    """For every reported state, resource state and VE (none, running, stopping):
    the shortcut is taken exactly when the full rule changes nothing and answers none."""
    session = qrm_ctx.session
    ves_by_id = {ve_id: session.get(VirtualEnvironment, ve_id) for ve_id in ve_ids.values()}
    cases = itertools.product(
        ("idle", "active"), ResourceState.values(), (None, ve_ids["up"], ve_ids["down"])
    )
    for reported, state, ve_id in cases:
        row = Resource(mac="02:51:00:00:00:99", state=state, ve_id=ve_id, boot_generation=3)
        before = (row.state, row.ve_id, row.boot_generation)
        with session.no_autoflush:
            command = _apply_heartbeat(qrm_ctx, row, reported)
        unchanged = command == "none" and (row.state, row.ve_id, row.boot_generation) == before
        recorded = bool(qrm_ctx._events)
        qrm_ctx.rollback()
        ve = ves_by_id.get(ve_id) if ve_id is not None else None
        running = ve is not None and ve.desired_state == VEDesiredState.RUNNING.value
        quiet = heartbeat_changes_nothing(reported, state, ve_id is not None, running)
        assert quiet == (unchanged and not recorded), (reported, state, ve_id)
        # An agent reporting failure always goes the full way (its resource goes to error).
        assert not heartbeat_changes_nothing("failed", state, ve_id is not None, running)


def test_a_quiet_heartbeat_updates_last_seen_and_load_only(qrm_settings, qrm_plugins) -> None:
    reg = _register(qrm_settings, qrm_plugins, "02:51:00:00:00:01")
    before = _row(qrm_settings, qrm_plugins, reg.resource_id)
    answer = _heartbeat(qrm_settings, qrm_plugins, reg.resource_id, reg.token, state="idle", load=0.25)
    after = _row(qrm_settings, qrm_plugins, reg.resource_id)
    assert answer.command == "none" and answer.boot_generation == 0
    assert after.load == 0.25 and after.last_seen is not None and after.last_seen >= before.last_seen
    assert (after.state, after.boot_generation, after.state_changed_at) == (
        before.state,
        before.boot_generation,
        before.state_changed_at,
    )


def test_an_old_boot_is_told_to_reboot_and_changes_nothing_else(qrm_settings, qrm_plugins) -> None:
    reg = _register(qrm_settings, qrm_plugins, "02:51:00:00:00:02", boot_generation=4)
    answer = _heartbeat(
        qrm_settings, qrm_plugins, reg.resource_id, reg.token, state="idle", load=1.5, boot_generation=3
    )
    row = _row(qrm_settings, qrm_plugins, reg.resource_id)
    assert (answer.command, answer.boot_generation) == ("reboot", 4)
    assert (row.state, row.boot_generation, row.load) == ("idle", 4, 1.5)


def test_heartbeats_that_change_something_still_do(qrm_settings, qrm_plugins) -> None:
    reg = _register(qrm_settings, qrm_plugins, "02:51:00:00:00:03")
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        agent.order_halt(ctx, reg.resource_id)
    assert _heartbeat(qrm_settings, qrm_plugins, reg.resource_id, reg.token, state="idle").command == "halt"
    assert _row(qrm_settings, qrm_plugins, reg.resource_id).state == "off"
    # Booted into a VE it does not serve: reboot ordered, generation raised.
    answer = _heartbeat(qrm_settings, qrm_plugins, reg.resource_id, reg.token, state="active")
    assert (answer.command, answer.boot_generation) == ("reboot", 1)


def test_a_failing_agent_is_put_in_error_at_once(qrm_settings, qrm_plugins) -> None:
    reg = _register(qrm_settings, qrm_plugins, "02:51:00:00:00:06")
    answer = _heartbeat(
        qrm_settings, qrm_plugins, reg.resource_id, reg.token, state="failed", reason="no root"
    )
    assert answer.command == "none"
    assert _row(qrm_settings, qrm_plugins, reg.resource_id).state == "error"


def test_heartbeat_authentication(qrm_settings, qrm_plugins) -> None:
    reg = _register(qrm_settings, qrm_plugins, "02:51:00:00:00:04")
    for rid, token in (
        (reg.resource_id, "wrong"),
        (reg.resource_id, None),
        (reg.resource_id + 1000, reg.token),
    ):
        with pytest.raises(AuthError, match="unknown resource or wrong token"):
            _heartbeat(qrm_settings, qrm_plugins, rid, token, state="idle", load=9.0)
    assert _row(qrm_settings, qrm_plugins, reg.resource_id).load is None
