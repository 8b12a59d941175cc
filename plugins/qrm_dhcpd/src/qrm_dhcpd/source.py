"""Where a full rewrite gets its reservations: the qrm database.

A full rewrite needs the MAC, address and hostname of every resource, fast:
the budget for 10,000 reservations (read, render, check, swap) is one second.
``qrm_core.services.resources.list_resources`` builds the complete public shape
of every resource (host names, VE names, ...) and takes about 0.9 s for
10,000 rows on SQLite, so this module reads the four columns it needs from the
``resource`` table directly, read-only, in one query (about 0.03 s). It is the
only place the plugin reads core's tables; a core service returning exactly
these columns would replace it.
"""

from __future__ import annotations

from sqlmodel import col, select

from qrm_core.config import Settings
from qrm_core.db import ensure_current, get_engine, session_scope
from qrm_core.models import Resource

Row = tuple[int | None, str, str | None, str | None]


def resource_rows(core: Settings) -> list[Row]:
    """``(id, mac, ip, hostname)`` of every resource, by id."""
    ensure_current(get_engine(core))
    with session_scope(core) as session:
        query = select(Resource.id, Resource.mac, Resource.ip, Resource.hostname).order_by(col(Resource.id))
        return [(r[0], r[1], r[2], r[3]) for r in session.exec(query).all()]


def address_owner(core: Settings, ip: str, mac: str, resource_id: int | None) -> str | None:
    """The MAC of an earlier resource (lower id) that has the address ``ip`` too, if any.

    A full rewrite gives a contested address to the resource entered first;
    a single change must decide the same way without reading every row. ISC
    dhcpd cannot look hosts up by address over OMAPI, so the database answers.
    """
    with session_scope(core) as session:
        query = select(Resource.mac).where(Resource.ip == ip, Resource.mac != mac)
        if resource_id is not None:
            query = query.where(col(Resource.id) < resource_id)
        return session.exec(query.order_by(col(Resource.id)).limit(1)).first()
