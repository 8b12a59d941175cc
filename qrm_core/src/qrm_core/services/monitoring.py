"""What monitoring plugins need to know of every resource and VE, in two queries.

A monitoring plugin renders a whole configuration (a host per resource, a
group per VE, the checks each VE asks for) and reports every agent's
heartbeat. :func:`list_resources` and :func:`list_ves` build every object's
full public shape (several ORM objects each): about a second for 10,000
resources. These read just the columns monitoring uses, without the ORM.
Use a read-only context (``read_context``) from a hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from qrm_core.models import FilesystemImage, Resource, StorageServer, VirtualEnvironment
from qrm_core.services import ServiceContext

_R: sa.Table = Resource.__table__  # type: ignore[attr-defined]
_VE: sa.Table = VirtualEnvironment.__table__  # type: ignore[attr-defined]
_FS: sa.Table = FilesystemImage.__table__  # type: ignore[attr-defined]
_ST: sa.Table = StorageServer.__table__  # type: ignore[attr-defined]

_RESOURCES = (
    sa.select(
        _R.c.id,
        _R.c.mac,
        _R.c.ip,
        _R.c.hostname,
        _R.c.host_id,
        _VE.c.name,
        _R.c.state,
        _R.c.last_seen,
        _R.c.heartbeat_timeout,
    )
    .select_from(_R.outerjoin(_VE, _VE.c.id == _R.c.ve_id))
    .order_by(_R.c.id)
)
_VES = (
    sa.select(
        _VE.c.id,
        _VE.c.name,
        _VE.c.monitor,
        _VE.c.failover,
        _VE.c.monitor_failover,
        _ST.c.name,
    )
    .select_from(_VE.join(_FS, _FS.c.id == _VE.c.fs_image_id).join(_ST, _ST.c.id == _FS.c.storage_id))
    .order_by(_VE.c.name)
)


@dataclass(frozen=True)
class MonitoredResource:
    """A resource as a monitoring plugin sees it.

    :ivar host_id: The resource a partition runs on (its hypervisor host), if any.
    :ivar ve: The name of the VE it serves, if any.
    :ivar state, last_seen, heartbeat_timeout: As in ``ResourcePublic``.
    """

    id: int
    mac: str
    ip: str | None
    hostname: str | None
    host_id: int | None
    ve: str | None
    state: str
    last_seen: datetime | None
    heartbeat_timeout: float | None

    @property
    def label(self) -> str:
        """How people name it: its hostname, else its MAC."""
        return self.hostname or self.mac


@dataclass(frozen=True)
class MonitoredVE:
    """A VE as a monitoring plugin sees it: what it asks of monitoring, and
    the storage server its filesystem image lives on."""

    id: int
    name: str
    monitor: tuple[str, ...]
    failover: bool
    monitor_failover: bool
    storage: str


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def monitoring_view(ctx: ServiceContext) -> tuple[list[MonitoredResource], list[MonitoredVE]]:
    """Every resource (by id) and every VE (by name), with what monitoring uses of them."""
    conn = ctx.session.connection()
    resources = [
        MonitoredResource(
            id=int(rid),
            mac=mac,
            ip=ip,
            hostname=hostname,
            host_id=host_id,
            ve=ve,
            state=state,
            last_seen=_aware(last_seen),
            heartbeat_timeout=timeout,
        )
        for rid, mac, ip, hostname, host_id, ve, state, last_seen, timeout in conn.execute(_RESOURCES)
    ]
    ves = [
        MonitoredVE(
            id=int(vid),
            name=name,
            monitor=tuple(_json_list(monitor)),
            failover=bool(failover),
            monitor_failover=bool(monitor_failover),
            storage=storage,
        )
        for vid, name, monitor, failover, monitor_failover, storage in conn.execute(_VES)
    ]
    if ctx.session.in_transaction():
        ctx.session.commit()  # a read: end it, so SQLite writers never wait behind it
    return resources, ves


def _json_list(value: object) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        import json

        try:
            parsed = json.loads(value)
        except ValueError:
            return []
        return [str(v) for v in parsed] if isinstance(parsed, list) else []
    return []
