"""Where the reservations come from: the qrm database, read-only.

A full rewrite needs the MAC, address and hostname of every resource, fast:
the budget for 10,000 reservations (read, render, check, swap) is one second.
Core's ``resource_addresses`` reads exactly those columns in one query (about
0.03 s for 10,000 rows on SQLite, against 0.9 s for the full public shape of
every resource), through a read-only context: a hook runs while the service
that fired it may still hold SQLite's write lock, and a read that asked for
it would wait (30 s, then "database is locked"); a read-only context never
asks for it, and in WAL mode a reader does not wait for a writer.
"""

from __future__ import annotations

from qrm_core.plugin_api import Settings, address_owner, read_context, resource_addresses

Row = tuple[int | None, str, str | None, str | None]


def resource_rows(core: Settings) -> list[Row]:
    """``(id, mac, ip, hostname)`` of every resource, by id."""
    with read_context(core) as ctx:
        return [(r.id, r.mac, r.ip, r.hostname) for r in resource_addresses(ctx)]


def first_owner(core: Settings, ip: str, mac: str, resource_id: int | None) -> str | None:
    """The MAC of an earlier resource (lower id) that has the address ``ip`` too, if any.

    A full rewrite gives a contested address to the resource entered first;
    a single change must decide the same way without reading every row. ISC
    dhcpd cannot look hosts up by address over OMAPI, so the database answers.
    """
    with read_context(core) as ctx:
        return address_owner(ctx, ip, mac, resource_id)
