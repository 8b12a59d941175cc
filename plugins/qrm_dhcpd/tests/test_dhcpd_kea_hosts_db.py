"""Kea's hosts database on the real PostgreSQL and MariaDB: reservations as rows, Kea untouched.

Each test creates its own database (``qrm_kea_<pid>_<n>``), creates Kea's
schema with ``qrm dhcpd db-init`` (``kea-admin``), starts Kea in a namespace
with ``hosts-database`` pointing at the server's unix socket (a unix socket
reaches the server from inside a namespace; 127.0.0.1 would not), and drops
the database afterwards.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from dhcpdlab import POOL, Wire, dhcpd_env, error_events, need
from sqlalchemy.engine import make_url

import qrm_dhcpd.plugin
from qrm_core.config import Settings
from qrm_core.plugins import PluginSystem
from qrm_core.services.resources import add_resource, remove_resource
from qrm_core.testing import missing, server_url
from qrm_dhcpd.kea import KeaControl
from qrm_dhcpd.keadb import KeaHostsDb, dispose_engines
from qrm_dhcpd.service import ManagedDhcpServer
from qrm_dhcpd.settings import load_settings

pytestmark = pytest.mark.netns

MAC = "52:54:00:12:34:56"
_counter = itertools.count()

PG_SOCKET_DIR = os.environ.get("QRM_TEST_POSTGRES_SOCKET_DIR", "/var/run/postgresql")
MYSQL_SOCKET = os.environ.get("QRM_TEST_MYSQL_SOCKET", "/run/mysqld/mysqld.sock")


@pytest.fixture
def hosts_db_url(qrm_backend: str) -> Iterator[str]:
    """An empty database for Kea's hosts; its URL as the plugin's setting takes it.

    Kea's hosts live in the same kind of server as qrm's database, and in
    PostgreSQL when qrm uses SQLite: three runs cover both host backends and
    every qrm database.
    """
    kind = "mariadb" if qrm_backend == "mariadb" else "postgresql"
    name = f"qrm_kea_{os.getpid()}_{next(_counter)}"
    admin_url = make_url(server_url(kind))
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    quote = '"' if kind == "postgresql" else "`"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {quote}{name}{quote}")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        missing(kind, f"cannot connect to {admin_url.render_as_string()}: {str(exc.orig).strip()}")
    if kind == "postgresql":
        if not Path(PG_SOCKET_DIR).is_dir():
            missing("PostgreSQL unix socket", f"{PG_SOCKET_DIR} (QRM_TEST_POSTGRES_SOCKET_DIR)")
        user = admin_url.username or "postgres"
        url = f"postgresql://{user}@/{name}?host={PG_SOCKET_DIR}"
    else:
        if not Path(MYSQL_SOCKET).exists():
            missing("MariaDB unix socket", f"{MYSQL_SOCKET} (QRM_TEST_MYSQL_SOCKET)")
        user = admin_url.username or "root"
        url = f"mysql://{user}@localhost/{name}?unix_socket={MYSQL_SOCKET}"
    try:
        yield url
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote}{name}{quote}")
        admin.dispose()


def test_reservations_are_rows_in_the_hosts_database(
    hosts_db_url: str,
    wire: Wire,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    qrm_settings: Settings,
    qrm_ctx,
    qrm_plugins: PluginSystem,
    qrm_cli,
    kea_bin: str,
) -> None:  # type: ignore[no-untyped-def]
    need("kea-admin", "kea-admin")
    dhcpd_env(
        monkeypatch,
        backend="kea",
        interface=wire.server_if,
        netns=wire.server_ns,
        socket_dir=short_dir,
        kea_hosts_database=hosts_db_url,
    )
    # before db-init: a clear error, nothing started
    with pytest.raises(Exception, match=r"no Kea schema.*db-init"):
        ManagedDhcpServer(load_settings(), qrm_settings).start()
    result = qrm_cli("dhcpd", "db-init")
    assert result.exit_code == 0, result.stderr

    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    add_resource(qrm_ctx, mac="52:54:00:00:00:01", ip="10.99.0.21", hostname="early")
    managed = ManagedDhcpServer(load_settings(), qrm_settings)
    managed.start()
    try:
        db = KeaHostsDb(hosts_db_url, 1)
        assert db.macs() == {"52:54:00:00:00:01": ("10.99.0.21", "early")}
        control = KeaControl(managed.backend.paths.control_socket)
        before = control.command("config-get")["arguments"]["Dhcp4"]

        add_resource(qrm_ctx, mac=MAC, ip="10.99.0.42", hostname="node42")
        assert db.macs()[MAC] == ("10.99.0.42", "node42")
        offer = wire.dhcp(MAC)
        assert offer is not None and (offer.ip, offer.hostname, offer.boot_file) == (
            "10.99.0.42",
            "node42",
            "undionly.kpxe",
        )

        # a second resource claiming the same address is reserved by name only
        add_resource(qrm_ctx, mac="52:54:00:00:00:02", ip="10.99.0.42", hostname="clash")
        assert db.macs()["52:54:00:00:00:02"] == (None, "clash")

        remove_resource(qrm_ctx, MAC)
        assert MAC not in db.macs()
        after = wire.dhcp(MAC)
        assert after is not None and after.ip != "10.99.0.42" and after.hostname is None
        assert POOL[0] <= (after.ip or "") <= POOL[1]

        # Kea's configuration never changed: the rows did all the work
        answer = control.command("config-get")["arguments"]["Dhcp4"]
        assert answer == before
        assert answer["subnet4"][0].get("reservations", []) == []
        assert managed.process is not None and managed.process.poll() is None

        # a full rewrite puts the subnet's rows right in one transaction, touching only what is wrong
        with db.engine.begin() as conn:
            conn.execute(sa.text("UPDATE hosts SET hostname = 'tampered' WHERE hostname = 'early'"))
            conn.execute(
                sa.text(
                    "INSERT INTO hosts (dhcp_identifier, dhcp_identifier_type, dhcp4_subnet_id, hostname) "
                    "VALUES (:i, 0, 1, 'stranger')"
                ),
                {"i": bytes.fromhex("525400ffffff")},
            )
        result = qrm_cli("dhcpd", "sync")
        assert result.exit_code == 0, result.stderr
        # early was tampered with: replaced; stranger: deleted; node42 is gone, so clash now gets .42
        assert "2 rows inserted, 3 deleted, 0 already right" in " ".join(result.stdout.split())
        assert db.macs() == {
            "52:54:00:00:00:01": ("10.99.0.21", "early"),
            "52:54:00:00:00:02": ("10.99.0.42", "clash"),
        }
        again = qrm_cli("dhcpd", "sync")
        assert "0 rows inserted, 0 deleted, 2 already right" in " ".join(again.stdout.split())
    finally:
        managed.stop()


def test_reservations_share_statements_on_postgresql(hosts_db_url: str, qrm_backend: str) -> None:
    """A registration waits for its reservation: on PostgreSQL a change is one statement,
    and changes arriving together share one (group commit)
    (docs/benchmarks.md, registrations with Kea), with the same rules as the
    general path (a MAC's row replaced, an address held by another MAC left out)."""
    import ipaddress

    from qrm_dhcpd.hosts import Host
    from qrm_dhcpd.keadb import db_init

    need("kea-admin", "kea-admin")
    db_init(hosts_db_url, "kea-admin")
    db = KeaHostsDb(hosts_db_url, 1)
    statements: list[str] = []

    def seen(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    sa.event.listen(db.engine, "before_cursor_execute", seen)
    try:
        first = db.upsert(Host("52:54:00:00:00:01", ipaddress.IPv4Address("10.99.0.21"), "a", 1))
        statements_per_change = len(statements)
        again = db.upsert(Host("52:54:00:00:00:01", ipaddress.IPv4Address("10.99.0.21"), "a2", 1))
        clash = db.upsert(Host("52:54:00:00:00:02", ipaddress.IPv4Address("10.99.0.21"), "b", 2))
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", seen)
    assert first == [] and again == []
    assert [p.message for p in clash] == [
        "address 10.99.0.21 is already reserved for 52:54:00:00:00:01; reserved without one"
    ]
    assert db.macs() == {"52:54:00:00:00:01": ("10.99.0.21", "a2"), "52:54:00:00:00:02": (None, "b")}
    if qrm_backend == "mariadb":  # Kea's hosts in MariaDB: the general path
        return
    assert statements_per_change == 1, statements

    # 40 registrations at once (the server's request threads) share statements
    # (group commit); two of them claim one address, one MAC changes twice.
    import threading

    from qrm_dhcpd.keadb import _batcher

    batcher = _batcher(db)
    before = batcher.statements
    hosts = [
        Host(f"52:54:00:00:01:{i:02x}", ipaddress.IPv4Address(f"10.99.1.{i}"), f"n{i}", i) for i in range(38)
    ]
    hosts.append(Host("52:54:00:00:02:01", ipaddress.IPv4Address("10.99.1.5"), "late", 99))  # n5's address
    hosts.append(Host("52:54:00:00:01:07", ipaddress.IPv4Address("10.99.1.77"), "n7", 7))  # n7 again
    problems: dict[str, list[str]] = {}
    start = threading.Barrier(len(hosts))

    def reserve(host: Host) -> None:
        start.wait()
        problems[host.hostname or ""] = [p.message for p in db.upsert(host)]

    threads = [threading.Thread(target=reserve, args=(h,)) for h in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(problems) == 39  # n7 twice
    shared = batcher.statements - before
    assert 1 <= shared < len(hosts), shared
    macs = db.macs()
    # whichever of n5 and "late" came first has 10.99.1.5, the other none (and was told)
    holders = [m for m in ("52:54:00:00:01:05", "52:54:00:00:02:01") if macs[m][0] == "10.99.1.5"]
    assert len(holders) == 1
    assert sum(1 for name in ("n5", "late") if problems[name]) == 1
    assert macs["52:54:00:00:01:07"][0] in ("10.99.1.7", "10.99.1.77")
    assert all(
        macs[f"52:54:00:00:01:{i:02x}"] == (f"10.99.1.{i}", f"n{i}") for i in range(38) if i not in (5, 7)
    )


def test_registrations_do_not_wait_for_the_hosts_database_while_the_server_runs(
    hosts_db_url: str,
    qrm_backend: str,
    monkeypatch: pytest.MonkeyPatch,
    qrm_settings: Settings,
    qrm_ctx,
    qrm_plugins: PluginSystem,
) -> None:  # type: ignore[no-untyped-def]
    """Inside ``qrm server`` (its services running) a resource hook queues the
    reservation and returns; the plugin's writer applies it. Shown with the
    hosts table locked by another session: the resources are added while no
    reservation can be written, and the reservations follow once it is free.
    With the hooks writing in the request (before the writer), the first
    ``add_resource`` waited for the lock."""
    import threading

    from qrm_core.server import start_plugin_services
    from qrm_dhcpd.keadb import _batcher, db_init
    from qrm_dhcpd.writer import ReservationWriter

    need("kea-admin", "kea-admin")
    db_init(hosts_db_url, "kea-admin")
    dhcpd_env(monkeypatch, backend="kea", kea_hosts_database=hosts_db_url)
    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    db = KeaHostsDb(hosts_db_url, 1)
    running = start_plugin_services(qrm_settings, qrm_plugins)
    locker = sa.create_engine(db.engine.url, poolclass=sa.pool.NullPool)
    try:
        (writer,) = running.started
        assert isinstance(writer, ReservationWriter)
        macs = [f"52:54:00:00:03:{i:02x}" for i in range(20)]
        with locker.connect() as conn:
            if qrm_backend == "mariadb":
                conn.exec_driver_sql("LOCK TABLES hosts WRITE")
            else:
                conn.exec_driver_sql("BEGIN")
                conn.exec_driver_sql("LOCK TABLE hosts IN ACCESS EXCLUSIVE MODE")
            adder = threading.Thread(
                target=lambda: [
                    add_resource(qrm_ctx, mac=mac, ip=f"10.99.0.{i + 20}", hostname=f"r{i}")
                    for i, mac in enumerate(macs)
                ]
            )
            adder.start()
            adder.join(20)
            added_while_locked = not adder.is_alive()
            assert writer.pending() >= 1
            if qrm_backend == "mariadb":
                conn.exec_driver_sql("UNLOCK TABLES")
            else:
                conn.exec_driver_sql("COMMIT")
        adder.join(60)
        assert added_while_locked, "a resource hook waited for the hosts database"
        before = _batcher(db).statements
        assert writer.flush(60)
        assert {m: db.macs().get(m) for m in macs} == {
            m: (f"10.99.0.{i + 20}", f"r{i}") for i, m in enumerate(macs)
        }
        if qrm_backend != "mariadb":
            # the one change stuck behind the lock went alone; the 19 queued meanwhile shared statements
            assert _batcher(db).statements - before < 10
        remove_resource(qrm_ctx, macs[0])
    finally:
        running.stop()  # applies what is queued first
        locker.dispose()
    assert macs[0] not in db.macs()
    assert error_events(qrm_ctx) == []
