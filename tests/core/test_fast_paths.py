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


FIRST_REGISTRATIONS = [
    {"mac": "02:51:00:00:01:01"},
    {"mac": "02:51:00:00:01:02", "hostname": "web1"},
    {"mac": "02:51:00:00:01:03", "hostname": "web1"},  # the name is taken: the MAC is the label
    {"mac": "02-51-00-00-01-04", "hypervisors": ["qemu", "QEMU", "xen"], "boot_generation": 7},
    {"mac": "0251.0000.0105", "ip": None, "cpus": 0, "memory_mb": 0},
]
COMPARED = [
    c
    for c in Resource.__table__.c.keys()
    if c not in ("id", "token_hash", "last_seen", "created_at", "state_changed_at")
]


def _first_registrations(settings, plugins, monkeypatch, *, general: bool, caplog):
    """Register FIRST_REGISTRATIONS on an empty database; the rows, the events
    and the audit log lines that result."""
    if general:
        monkeypatch.setattr(agent, "_register_first_sight", lambda *args, **kwargs: None)
    caplog.clear()
    for kwargs in FIRST_REGISTRATIONS:
        body = {"ip": "198.18.0.7", "cpus": 2, "memory_mb": 2048, **kwargs}
        with service_context(settings, actor="agent:x", plugins=plugins) as ctx:
            reg = agent.register(ctx, **body)
        assert reg.state == "idle" and reg.resource_id > 0
        # The token handed out is the one that authenticates.
        answer = _heartbeat(
            settings, plugins, reg.resource_id, reg.token, state="idle", boot_generation=reg.boot_generation
        )
        assert answer.command == "none"
    monkeypatch.undo()
    with service_context(settings, plugins=plugins) as ctx:
        rows = [
            {c: getattr(row, c) for c in COMPARED}
            for row in ctx.session.exec(select(Resource).order_by(Resource.id)).all()
        ]
        events = [
            (e.actor, e.object_type, e.object_name, e.level, e.message)
            for e in ctx.session.exec(select(Event).order_by(Event.id)).all()
        ]
        ctx.session.execute(sa.delete(Event))
        ctx.session.execute(sa.delete(Resource))
        ctx.session.commit()
    lines = [r.getMessage().split(" ", 1)[1] for r in caplog.records if r.name == "qrm.audit"]
    return rows, events, lines


def test_a_first_registration_writes_what_the_general_rule_writes(
    qrm_settings, qrm_plugins, monkeypatch, caplog
) -> None:
    """The ORM-free path for machines never seen before and the general rule
    agree on the resource rows, the events and the audit log lines."""
    caplog.set_level(logging.INFO, logger="qrm.audit")
    fast = _first_registrations(qrm_settings, qrm_plugins, monkeypatch, general=False, caplog=caplog)
    general = _first_registrations(qrm_settings, qrm_plugins, monkeypatch, general=True, caplog=caplog)
    assert fast == general
    rows, events, lines = fast
    assert [r["hostname"] for r in rows] == [None, "web1", None, None, None]
    assert rows[3]["capabilities"] == ["qemu", "xen"] and rows[3]["boot_generation"] == 7
    assert len(events) == 2 * len(FIRST_REGISTRATIONS) and len(lines) == len(events)


def test_a_first_registration_tells_listening_plugins(qrm_settings, qrm_plugins) -> None:
    """resource_added, resource_state_changed and event_recorded reach plugins
    on the fast path as on the general one."""
    from qrm_core import hookimpl

    seen: list[tuple] = []

    class Listener:
        @hookimpl
        def qrm_resource_added(self, resource, ctx) -> None:
            seen.append(("added", resource.mac, resource.state))

        @hookimpl
        def qrm_resource_state_changed(self, resource, old_state, ctx) -> None:
            seen.append(("state", resource.mac, old_state, resource.state))

        @hookimpl
        def qrm_event_recorded(self, event, ctx) -> None:
            seen.append(("event", event.message))

    qrm_plugins.register(Listener(), "listener")
    _register(qrm_settings, qrm_plugins, "02:51:00:00:02:01")
    assert sorted(seen) == sorted(
        [
            ("event", "resource 02:51:00:00:02:01 registered (physical)"),
            ("event", "resource 02:51:00:00:02:01 new -> idle: registered"),
            ("added", "02:51:00:00:02:01", "idle"),
            ("state", "02:51:00:00:02:01", "new", "idle"),
        ]
    )


def test_a_first_registration_tells_plugins_without_reading_the_row_again(qrm_settings, qrm_plugins) -> None:
    """With plugins listening, a first registration runs the statements it runs
    without them (the hooks' view is built from the row just written, not read
    back in one more transaction: docs/benchmarks.md, "Registrations with the
    plugins installed"), and that view is the row as the database holds it."""
    from qrm_core import hookimpl
    from qrm_core.db import get_engine
    from qrm_core.services import public

    statements: list[str] = []

    def seen(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    engine = get_engine(qrm_settings)
    _register(qrm_settings, qrm_plugins, "02:51:00:00:03:00")  # connections made, schema checked
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        _register(qrm_settings, qrm_plugins, "02:51:00:00:03:01")
        alone = list(statements)
        added: list = []
        changed: list = []

        class Listener:
            @hookimpl
            def qrm_resource_added(self, resource, ctx) -> None:
                added.append(resource)

            @hookimpl
            def qrm_resource_state_changed(self, resource, old_state, ctx) -> None:
                changed.append(resource)

        qrm_plugins.register(Listener(), "listener")
        statements.clear()
        reg = _register(
            qrm_settings, qrm_plugins, "02:51:00:00:03:02", hostname="db1", hypervisors=["xen", "qemu"]
        )
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    assert statements == alone, (alone, statements)
    assert len(added) == 1 and changed == added
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        stored = public.one_resource(ctx.session, ctx.session.get(Resource, reg.resource_id))

    def comparable(resource) -> dict:
        data = resource.model_dump()
        for key in ("last_seen", "created_at", "state_changed_at"):  # the database's own precision
            data[key] = data[key].replace(microsecond=0, tzinfo=None)
        return data

    assert comparable(added[0]) == comparable(stored)
    assert (added[0].hostname, added[0].capabilities, added[0].state) == ("db1", ["qemu", "xen"], "idle")


def test_a_first_registration_that_loses_a_race_is_registered_once(qrm_settings, qrm_plugins) -> None:
    """Two agents with one MAC registering at the same moment: one resource, and
    one token; the others see the winner's live registration and are refused
    (a machine keeps its identity while its agent is alive, issue 15)."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(_: int) -> agent.Registration | agent.RegistrationRefused:
        try:
            return _register(qrm_settings, qrm_plugins, mac, source="198.18.0.7")
        except agent.RegistrationRefused as exc:
            return exc

    mac = "02:51:00:00:03:01"
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    regs = [o for o in outcomes if isinstance(o, agent.Registration)]
    assert len(regs) == 1
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        assert len(ctx.session.exec(select(Resource).where(Resource.mac == mac)).all()) == 1
        registered = ctx.session.exec(select(Event).where(Event.message.like("%registered (physical)"))).all()
        assert len(registered) == 1
        refused = ctx.session.exec(
            select(Event).where(Event.message.like("%refused: its agent is alive%"))
        ).all()
        assert len(refused) == 7 and all("from 198.18.0.7" in e.message for e in refused)


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
