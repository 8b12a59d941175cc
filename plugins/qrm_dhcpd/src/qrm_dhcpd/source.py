"""Where the reservations come from: the qrm database, read-only.

A full rewrite needs the MAC, address and hostname of every resource, fast:
the budget for 10,000 reservations (read, render, check, swap) is one second.
``qrm_core.services.resources.list_resources`` builds the complete public shape
of every resource (host names, VE names, ...) and takes about 0.9 s for
10,000 rows on SQLite, so this module reads the four columns it needs from the
``resource`` table directly, read-only, in one query (about 0.03 s). It is the
only place the plugin reads core's tables; a core service returning exactly
these columns would replace it.

SQLite: core's engine begins every transaction with ``BEGIN IMMEDIATE`` (the
write lock), also for reads. A hook runs while the service that fired it may
still hold such a transaction open, and a second ``BEGIN IMMEDIATE`` from the
hook would wait for it (30 s, then "database is locked"). Reads here therefore
use a connection of their own that never takes the write lock; in WAL mode
(which core sets) a reader does not wait for a writer.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlmodel import col, select

from qrm_core.config import Settings
from qrm_core.db import ensure_current, get_engine
from qrm_core.errors import DatabaseUnavailable
from qrm_core.models import Resource

Row = tuple[int | None, str, str | None, str | None]

_readers: dict[str, Engine] = {}
_lock = threading.Lock()


def read_engine(core: Settings) -> Engine:
    """An engine for reading: core's own, except on SQLite (see the module text)."""
    url = core.effective_database_url
    if make_url(url).get_backend_name() != "sqlite":
        return get_engine(core)
    with _lock:
        engine = _readers.get(url)
        if engine is None:
            engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            _readers[url] = engine
        return engine


def dispose_readers() -> None:
    with _lock:
        for engine in _readers.values():
            engine.dispose()
        _readers.clear()


def _fetch(core: Settings, query: sa.Select) -> list[sa.Row]:
    try:
        with read_engine(core).connect() as conn:
            return list(conn.execute(query).all())
    except sa.exc.OperationalError as exc:
        text = str(getattr(exc, "orig", exc)).strip().splitlines()
        raise DatabaseUnavailable(f"cannot read the resources: {text[0] if text else exc}") from None


def resource_rows(core: Settings) -> list[Row]:
    """``(id, mac, ip, hostname)`` of every resource, by id."""
    ensure_current(read_engine(core))
    query = select(Resource.id, Resource.mac, Resource.ip, Resource.hostname).order_by(col(Resource.id))
    return [(r[0], r[1], r[2], r[3]) for r in _fetch(core, query)]


def address_owner(core: Settings, ip: str, mac: str, resource_id: int | None) -> str | None:
    """The MAC of an earlier resource (lower id) that has the address ``ip`` too, if any.

    A full rewrite gives a contested address to the resource entered first;
    a single change must decide the same way without reading every row. ISC
    dhcpd cannot look hosts up by address over OMAPI, so the database answers.
    """
    query = select(Resource.mac).where(Resource.ip == ip, Resource.mac != mac)
    if resource_id is not None:
        query = query.where(col(Resource.id) < resource_id)
    rows = _fetch(core, query.order_by(col(Resource.id)).limit(1))
    return str(rows[0][0]) if rows else None
