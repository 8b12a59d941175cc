"""Plugins' own records: JSON values by ``(plugin, key)`` in the site's database.

For what a plugin must remember and every qrm server of the site must see
(a vCenter connection, a sync cursor), without a table of its own. The
functions work in the caller's transaction: the caller records an event
(:meth:`ServiceContext.record`) and commits, as every service does. Values
are JSON objects; a plugin encrypts secrets before it puts them here (they
are plain in the database otherwise).
"""

from __future__ import annotations

import re
from typing import Any

from sqlmodel import Session, col, select

from qrm_core.config import Settings
from qrm_core.db import READONLY_OPTION, get_engine
from qrm_core.errors import InvalidInput
from qrm_core.models import PluginData, utcnow
from qrm_core.services import ServiceContext

_PLUGIN_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def _check(plugin: str, key: str | None = None) -> None:
    if not _PLUGIN_RE.fullmatch(plugin):
        raise InvalidInput(f"invalid plugin name {plugin!r}")
    if key is not None and not _KEY_RE.fullmatch(key):
        raise InvalidInput(
            f"invalid record key {key!r}: use 1-128 letters, digits and '.', '_', ':', '/', '-'"
        )


def get_record(ctx: ServiceContext, plugin: str, key: str) -> dict[str, Any] | None:
    """The value stored under ``key``, or None."""
    _check(plugin, key)
    row = ctx.session.get(PluginData, (plugin, key))
    return dict(row.value) if row is not None else None


def put_record(ctx: ServiceContext, plugin: str, key: str, value: dict[str, Any]) -> None:
    """Store ``value`` under ``key`` (replacing what was there), in the current transaction."""
    _check(plugin, key)
    if not isinstance(value, dict):
        raise InvalidInput("a plugin record is a JSON object")
    row = ctx.session.get(PluginData, (plugin, key))
    if row is None:
        row = PluginData(plugin=plugin, key=key, value=dict(value))
    else:
        row.value = dict(value)  # a new object: the JSON column sees the change
        row.changed_at = utcnow()
    ctx.session.add(row)


def delete_record(ctx: ServiceContext, plugin: str, key: str) -> bool:
    """Remove the record, in the current transaction; False if there was none."""
    _check(plugin, key)
    row = ctx.session.get(PluginData, (plugin, key))
    if row is None:
        return False
    ctx.session.delete(row)
    ctx.flush()
    return True


def list_records(ctx: ServiceContext, plugin: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every record of ``plugin`` whose key starts with ``prefix``, by key."""
    _check(plugin)
    query = select(PluginData).where(PluginData.plugin == plugin).order_by(col(PluginData.key))
    if prefix:
        query = query.where(col(PluginData.key).startswith(prefix, autoescape=True))
    return {row.key: dict(row.value) for row in ctx.session.exec(query)}


def read_record(settings: Settings, plugin: str, key: str) -> dict[str, Any] | None:
    """:func:`get_record` for code that has no service context (a driver).

    Its own short read-only session: no plugin system, no write lock (on
    SQLite it never waits for a writer, even one that is calling this
    driver), nothing held afterwards.
    """
    _check(plugin, key)
    engine = get_engine(settings).execution_options(**{READONLY_OPTION: True})
    with Session(engine) as session:
        row = session.get(PluginData, (plugin, key))
        return dict(row.value) if row is not None else None
