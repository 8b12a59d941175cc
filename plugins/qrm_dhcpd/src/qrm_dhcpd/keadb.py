"""Kea's hosts database (PostgreSQL or MySQL/MariaDB): reservations as rows.

Kea 2.2 in Debian 12 ships no ``host_cmds`` hook, so the only built-in way to
change a reservation in a running Kea without this is ``config-set`` with the
whole configuration, whose cost grows with the number of reservations. With a
hosts database Kea looks reservations up per request, so adding, changing or
removing one is one short transaction on one indexed row: the same work at 10
resources or at 10,000, and Kea is not touched at all.

The schema is Kea's own (``kea-admin db-init``). qrm owns every reservation
filed under its subnet id (``QRM_DHCPD_KEA_SUBNET_ID``): a full rewrite
replaces them all in one transaction, so Kea sees the old set or the new one.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from qrm_core.plugin_api import InvalidInput, PluginError
from qrm_dhcpd.hosts import Host, Problem

HW_ADDRESS = 0  # Kea's host_identifier_type for hw-address

#: What may reach Kea's connection parameters (Kea builds a libpq/MySQL
#: connection string from them, so quotes and spaces must not get through).
_DB_TOKEN = re.compile(r"^[A-Za-z0-9_.@/+:-]{1,128}$")
_DB_PASSWORD = re.compile(r"^[\x21-\x7e]{1,128}$")

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def parse(url_text: str) -> tuple[URL, str]:
    """The SQLAlchemy URL to connect with and Kea's database type (``postgresql``/``mysql``)."""
    try:
        url = make_url(url_text)
    except ArgumentError:
        raise InvalidInput("QRM_DHCPD_KEA_HOSTS_DATABASE is not a database URL") from None
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        kind, driver = "postgresql", "postgresql+psycopg"
    elif backend in ("mysql", "mariadb"):
        kind, driver = "mysql", "mysql+pymysql"
    else:
        raise InvalidInput(
            f"QRM_DHCPD_KEA_HOSTS_DATABASE: Kea keeps hosts in PostgreSQL or MySQL/MariaDB, not {backend!r}"
        )
    if not url.database:
        raise InvalidInput("QRM_DHCPD_KEA_HOSTS_DATABASE names no database")
    return url.set(drivername=driver), kind


def kea_params(url_text: str) -> dict[str, Any]:
    """The ``hosts-database`` map of Kea's configuration for the URL.

    PostgreSQL over a unix socket: ``postgresql://user@/db?host=/run/postgresql``
    (libpq takes a directory as host). MySQL/MariaDB: host ``localhost`` makes
    Kea use the server's default unix socket.
    """
    url, kind = parse(url_text)
    host = url.host
    if kind == "postgresql" and not host:
        query_host = url.query.get("host")
        host = query_host if isinstance(query_host, str) else None
    if kind == "mysql" and (not host or "unix_socket" in url.query):
        host = "localhost"
    params: dict[str, Any] = {"type": kind, "name": url.database}
    if host:
        params["host"] = host
    if url.port:
        params["port"] = int(url.port)
    if url.username:
        params["user"] = url.username
    if url.password:
        password = str(url.password)
        if not _DB_PASSWORD.match(password) or "'" in password or "\\" in password:
            raise InvalidInput("QRM_DHCPD_KEA_HOSTS_DATABASE: the password may not contain quotes or spaces")
        params["password"] = password
    for key in ("name", "host", "user"):
        value = params.get(key)
        if value is not None and not _DB_TOKEN.match(str(value)):
            raise InvalidInput(
                f"QRM_DHCPD_KEA_HOSTS_DATABASE: the {key} {value!r} has characters Kea cannot take"
            )
    params["connect-timeout"] = 5
    return params


def engine(url_text: str) -> Engine:
    """One engine per URL for this process."""
    with _lock:
        found = _engines.get(url_text)
        if found is None:
            url, _kind = parse(url_text)
            try:
                found = sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
            except (NoSuchModuleError, ImportError) as exc:
                raise PluginError(f"no database driver for the Kea hosts database: {exc}") from None
            _engines[url_text] = found
        return found


def dispose_engines() -> None:
    with _lock:
        for found in _engines.values():
            found.dispose()
        _engines.clear()


#: Tries of a MySQL/MariaDB change that InnoDB undid to break a deadlock (changes of
#: several MACs at once lock neighbouring index gaps; the server's writer applies a
#: round's changes in parallel).
DEADLOCK_RETRIES = 5
#: ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT
_RETRYABLE = frozenset({1213, 1205})


def _deadlock(exc: DBAPIError) -> bool:
    args: tuple[Any, ...] = tuple(getattr(exc.orig, "args", ()))
    return bool(args) and args[0] in _RETRYABLE


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", exc) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class KeaHostsDb:
    """Reservations of one subnet in Kea's ``hosts`` table."""

    def __init__(self, url_text: str, subnet_id: int) -> None:
        self.url_text = url_text
        self.subnet_id = subnet_id
        self.engine = engine(url_text)

    def _fail(self, what: str, exc: BaseException) -> PluginError:
        return PluginError(f"Kea hosts database: cannot {what}: {_short(exc)}")

    # -- checks ----------------------------------------------------------

    def schema_version(self) -> str:
        """Kea's schema version in the database; a one-line error if there is no Kea schema."""
        try:
            with self.engine.connect() as conn:
                row = conn.execute(sa.text("SELECT version, minor FROM schema_version")).first()
        except DBAPIError as exc:
            text = _short(exc)
            if "schema_version" in text:
                raise PluginError(
                    "the Kea hosts database has no Kea schema; create it with 'qrm dhcpd db-init'"
                ) from None
            raise self._fail("connect", exc) from None
        if row is None:
            raise PluginError("the Kea hosts database has an empty schema_version table")
        return f"{row[0]}.{row[1]}"

    def count(self) -> int:
        try:
            with self.engine.connect() as conn:
                return int(
                    conn.execute(
                        sa.text("SELECT count(*) FROM hosts WHERE dhcp4_subnet_id = :sid"),
                        {"sid": self.subnet_id},
                    ).scalar_one()
                )
        except DBAPIError as exc:
            raise self._fail("count reservations", exc) from None

    def macs(self) -> dict[str, tuple[str | None, str | None]]:
        """Every reservation of the subnet: MAC -> (address, hostname). For tests and ``status``."""
        query = sa.text(
            "SELECT dhcp_identifier, ipv4_address, hostname FROM hosts "
            "WHERE dhcp4_subnet_id = :sid AND dhcp_identifier_type = :t"
        )
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(query, {"sid": self.subnet_id, "t": HW_ADDRESS}).all()
        except DBAPIError as exc:
            raise self._fail("read reservations", exc) from None
        result = {}
        for ident, ip, hostname in rows:
            mac = ":".join(f"{b:02x}" for b in bytes(ident))
            result[mac] = (str(ipaddress.IPv4Address(int(ip))) if ip is not None else None, hostname)
        return result

    # -- changes ---------------------------------------------------------

    def _row(self, host: Host) -> dict[str, Any]:
        return {
            "ident": bytes.fromhex(host.hex),
            "t": HW_ADDRESS,
            "sid": self.subnet_id,
            "ip": int(host.ip) if host.ip is not None else None,
            "hostname": host.hostname,
            "ctx": json.dumps({"qrm": {"resource": host.resource_id}}),
        }

    _INSERT = sa.text(
        "INSERT INTO hosts (dhcp_identifier, dhcp_identifier_type, dhcp4_subnet_id, ipv4_address, "
        "hostname, user_context) VALUES (:ident, :t, :sid, :ip, :hostname, :ctx)"
    )
    _DELETE = sa.text(
        "DELETE FROM hosts WHERE dhcp_identifier = :ident AND dhcp_identifier_type = :t AND dhcp4_subnet_id = :sid"
    )

    @property
    def batches(self) -> bool:
        """Whether :meth:`upsert_many` writes several reservations per statement (PostgreSQL)."""
        return self.engine.dialect.name == "postgresql"

    def upsert_many(self, hosts: list[Host]) -> list[list[Problem] | PluginError]:
        """PostgreSQL: put these reservations in place together (shared statements, the
        rules of :meth:`upsert`); for each, its problems or the error that stopped it."""
        outcomes = _batcher(self).submit_many([self._row(host) for host in hosts])
        return [self._outcome(host, outcome) for host, outcome in zip(hosts, outcomes, strict=True)]

    def _outcome(self, host: Host, outcome: Any) -> list[Problem] | PluginError:
        if isinstance(outcome, DBAPIError):
            return self._fail(f"reserve {host.mac}", outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is None:
            return []
        owner = ":".join(f"{b:02x}" for b in bytes(outcome))
        return [Problem(host.mac, f"address {host.ip} is already reserved for {owner}; reserved without one")]

    def upsert(self, host: Host) -> list[Problem]:
        """Put one reservation in place of any older one for the MAC (one transaction)."""
        problems: list[Problem] = []
        row = self._row(host)
        if self.batches:
            outcome = self._outcome(host, _batcher(self).submit(row))
            if isinstance(outcome, PluginError):
                raise outcome from None
            return outcome
        for attempt in range(DEADLOCK_RETRIES):
            try:
                return problems + self._upsert_once(row, host)
            except DBAPIError as exc:
                if attempt + 1 < DEADLOCK_RETRIES and _deadlock(exc):
                    continue  # InnoDB chose this one to undo: its locks are gone, go again
                raise self._fail(f"reserve {host.mac}", exc) from None
        raise AssertionError("unreachable")

    def _upsert_once(self, row: dict[str, Any], host: Host) -> list[Problem]:
        """MySQL/MariaDB: the MAC's row deleted and inserted again, in one transaction."""
        problems: list[Problem] = []
        row = dict(row)
        with self.engine.begin() as conn:
            conn.execute(self._DELETE, row)
            if row["ip"] is not None:
                other = conn.execute(
                    sa.text(
                        "SELECT dhcp_identifier FROM hosts WHERE ipv4_address = :ip AND dhcp4_subnet_id = :sid"
                    ),
                    row,
                ).first()
                if other is not None:
                    owner = ":".join(f"{b:02x}" for b in bytes(other[0]))
                    problems.append(
                        Problem(
                            host.mac,
                            f"address {host.ip} is already reserved for {owner}; reserved without one",
                        )
                    )
                    row["ip"] = None
            conn.execute(self._INSERT, row)
        return problems

    def remove(self, mac_hex: str) -> bool:
        """Drop the reservation of a MAC (12 hex digits); whether there was one."""
        params = {"ident": bytes.fromhex(mac_hex), "t": HW_ADDRESS, "sid": self.subnet_id}
        for attempt in range(DEADLOCK_RETRIES):
            try:
                with self.engine.begin() as conn:
                    return bool(conn.execute(self._DELETE, params).rowcount)
            except DBAPIError as exc:
                if attempt + 1 < DEADLOCK_RETRIES and _deadlock(exc):
                    continue
                raise self._fail("remove a reservation", exc) from None
        raise AssertionError("unreachable")

    def replace_all(self, hosts: list[Host]) -> dict[str, int]:
        """Make the subnet's reservations exactly ``hosts``, in one transaction.

        Rows that are already right stay untouched; only stale rows are
        deleted and only missing ones inserted, so a rewrite that changes
        little costs one read of the subnet's rows. Kea sees the old set or
        the new one, never a mix.
        """
        wanted = {row["ident"]: row for row in (self._row(h) for h in hosts)}
        keep: set[bytes] = set()
        stale: list[int] = []
        query = sa.text(
            "SELECT host_id, dhcp_identifier, dhcp_identifier_type, ipv4_address, hostname, user_context "
            "FROM hosts WHERE dhcp4_subnet_id = :sid"
        )
        delete = sa.text("DELETE FROM hosts WHERE host_id IN :ids").bindparams(
            sa.bindparam("ids", expanding=True)
        )
        try:
            with self.engine.begin() as conn:
                for host_id, ident, kind, ip, hostname, ctx in conn.execute(query, {"sid": self.subnet_id}):
                    key = bytes(ident)
                    row = wanted.get(key) if kind == HW_ADDRESS else None
                    same = row is not None and (row["ip"], row["hostname"], row["ctx"]) == (
                        None if ip is None else int(ip),
                        hostname,
                        ctx,
                    )
                    if same and key not in keep:
                        keep.add(key)
                    else:
                        stale.append(int(host_id))
                for start in range(0, len(stale), 1000):
                    conn.execute(delete, {"ids": stale[start : start + 1000]})
                rows = [row for key, row in wanted.items() if key not in keep]
                if rows:
                    conn.execute(self._INSERT, rows)
        except DBAPIError as exc:
            raise self._fail("replace the reservations", exc) from None
        return {"kept": len(keep), "deleted": len(stale), "inserted": len(rows)}


def db_init(url_text: str, kea_admin: str, timeout: float = 120.0) -> str:
    """Create Kea's schema with ``kea-admin db-init`` (the database itself must exist)."""
    params = kea_params(url_text)
    backend = "pgsql" if params["type"] == "postgresql" else "mysql"
    argv = [kea_admin, "db-init", backend, "-n", params["name"]]
    if "user" in params:
        argv += ["-u", params["user"]]
    if "password" in params:
        argv += ["-p", params["password"]]
    if "host" in params:
        argv += ["-h", params["host"]]
    if "port" in params:
        argv += ["-P", str(params["port"])]
    try:
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise PluginError(f"{kea_admin} is not installed (Debian package kea-admin)") from None
    except subprocess.TimeoutExpired:
        raise PluginError(f"kea-admin db-init did not finish in {timeout:.0f} s") from None
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0:
        lines = [line for line in output.splitlines() if "ERROR" in line or "error" in line.lower()]
        raise PluginError(
            f"kea-admin db-init failed: {(lines or output.splitlines() or ['no output'])[-1].strip()}"
        )
    versions = [line for line in output.splitlines() if "version" in line.lower()]
    return versions[-1].strip() if versions else "schema created"


# ---------------------------------------------------------------------------
# Reservations on PostgreSQL: group commit
# ---------------------------------------------------------------------------


class _Pending:
    __slots__ = ("done", "outcome", "row")

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self.done = False
        self.outcome: Any = None


class _Batcher:
    """Reservations of one hosts database and subnet, written together.

    A registration waits until its reservation is in the database, as before;
    the changes that arrive while one statement runs wait together and go in
    the next one (group commit). One statement reserves them all: each row
    inserted or updated in place for its MAC, its address left out when another
    MAC holds it. A batch never holds two changes of one MAC or one address
    (the later one waits for the next batch), so the outcome is the one of
    making the changes one after another. When a rack powers on, 40 request
    threads registering at once share a handful of statements instead of
    running a transaction each (docs/benchmarks.md).
    """

    def __init__(self, engine: Engine, subnet_id: int) -> None:
        self.engine = engine
        self.subnet_id = subnet_id
        self.cond = threading.Condition()
        self.queue: list[_Pending] = []
        self.running = False
        self.statements = 0  # batches written (tests count them)

    def submit(self, row: dict[str, Any]) -> Any:
        """The owner's identifier when the address is taken, None, or the DBAPIError."""
        return self.submit_many([row])[0]

    def submit_many(self, rows: list[dict[str, Any]]) -> list[Any]:
        """:meth:`submit` for several changes at once (the server's reservation writer):
        the outcome of each, in order. They share statements with each other and with
        whatever else is queued, within the same rules."""
        entries = [_Pending(row) for row in rows]
        with self.cond:
            self.queue.extend(entries)
            while not all(entry.done for entry in entries):
                if self.running:
                    self.cond.wait()
                    continue
                self.running = True
                batch = self._take()
                self.cond.release()
                try:
                    outcomes = self._write(batch)
                except BaseException as exc:  # noqa: BLE001 - every waiter of the batch gets it, none waits for ever
                    outcomes = {id(item): exc for item in batch}
                finally:
                    self.cond.acquire()
                    self.running = False
                for item in batch:
                    item.outcome = outcomes.get(id(item))
                    item.done = True
                self.cond.notify_all()
        return [entry.outcome for entry in entries]

    def _take(self) -> list[_Pending]:
        """The queued changes with distinct MACs and addresses, oldest first."""
        batch: list[_Pending] = []
        macs: set[bytes] = set()
        ips: set[int] = set()
        rest: list[_Pending] = []
        for item in self.queue:
            ident, ip = item.row["ident"], item.row["ip"]
            if ident in macs or (ip is not None and ip in ips) or len(batch) >= 500:
                rest.append(item)
                continue
            macs.add(ident)
            if ip is not None:
                ips.add(ip)
            batch.append(item)
        self.queue = rest
        return batch

    #: One statement for every batch, whatever its size: the rows go in as four arrays,
    #: so the statement's text never changes (compiled once here, and prepared once by
    #: PostgreSQL) instead of a VALUES list of its own for each size of batch.
    _UPSERT = sa.text(
        "WITH v AS (SELECT * FROM unnest(CAST(:idents AS BYTEA[]), CAST(:ips AS BIGINT[]), "
        "CAST(:hostnames AS VARCHAR[]), CAST(:ctxs AS TEXT[])) WITH ORDINALITY AS v (ident, ip, hostname, ctx, n)), "
        "o AS (SELECT v.*, (SELECT h.dhcp_identifier FROM hosts h"
        " WHERE h.ipv4_address = v.ip AND h.dhcp4_subnet_id = :sid"
        " AND NOT (h.dhcp_identifier = v.ident AND h.dhcp_identifier_type = :t) LIMIT 1) AS other FROM v), "
        "ins AS (INSERT INTO hosts (dhcp_identifier, dhcp_identifier_type, dhcp4_subnet_id, ipv4_address, "
        "hostname, user_context) "
        "SELECT ident, :t, :sid, CASE WHEN other IS NULL THEN ip END, hostname, ctx FROM o ORDER BY n "
        "ON CONFLICT (dhcp_identifier, dhcp_identifier_type, dhcp4_subnet_id) "
        "WHERE dhcp4_subnet_id IS NOT NULL DO UPDATE SET ipv4_address = EXCLUDED.ipv4_address, "
        "hostname = EXCLUDED.hostname, user_context = EXCLUDED.user_context) "
        "SELECT n, other FROM o"
    )

    def _write(self, batch: list[_Pending]) -> dict[int, Any]:
        rows = [item.row for item in batch]
        params: dict[str, Any] = {
            "t": HW_ADDRESS,
            "sid": self.subnet_id,
            "idents": [row["ident"] for row in rows],
            "ips": [row["ip"] for row in rows],
            "hostnames": [row["hostname"] for row in rows],
            "ctxs": [row["ctx"] for row in rows],
        }
        self.statements += 1
        try:
            with self.engine.connect() as conn:
                found = (
                    conn.execution_options(isolation_level="AUTOCOMMIT").execute(self._UPSERT, params).all()
                )
        except DBAPIError as exc:
            return {id(item): exc for item in batch}
        # ORDINALITY counts from 1.
        return {id(batch[n - 1]): other for n, other in found}


_batchers: dict[tuple[str, int], _Batcher] = {}


def _batcher(db: KeaHostsDb) -> _Batcher:
    with _lock:
        found = _batchers.get((db.url_text, db.subnet_id))
        if found is None or found.engine is not db.engine:
            found = _Batcher(db.engine, db.subnet_id)
            _batchers[(db.url_text, db.subnet_id)] = found
        return found
