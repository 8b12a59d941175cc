"""Resources: the machines qrm boots, and their life cycle.

The allowed state transitions (DESIGN.md section 2) are in :data:`TRANSITIONS`
and nowhere else; :func:`transition` is the only code that changes a
resource's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import col, func, select

from qrm_core.context import HealthCheck
from qrm_core.errors import AlreadyExists, IllegalTransition, InUse, InvalidInput, NotFound
from qrm_core.models import (
    EventLevel,
    Partition,
    Resource,
    ResourceKind,
    ResourcePublic,
    ResourceState,
    VirtualEnvironment,
    utcnow,
)
from qrm_core.services import ServiceContext, public
from qrm_core.services import validation as v

S = ResourceState

#: state -> states it may move to.
TRANSITIONS: dict[ResourceState, frozenset[ResourceState]] = {
    S.NEW: frozenset({S.IDLE, S.ERROR, S.OFF}),
    S.IDLE: frozenset({S.ASSIGNED, S.ERROR, S.OFF}),
    S.ASSIGNED: frozenset({S.BOOTING, S.IDLE, S.ERROR, S.OFF}),
    S.BOOTING: frozenset({S.ACTIVE, S.IDLE, S.ERROR, S.OFF}),
    S.ACTIVE: frozenset({S.IDLE, S.BOOTING, S.ERROR, S.OFF}),
    # A resource in error that still serves its VE (failover off) resumes when
    # its heartbeats do; a released one comes back idle.
    S.ERROR: frozenset({S.IDLE, S.OFF, S.BOOTING, S.ACTIVE}),
    S.OFF: frozenset({S.IDLE, S.ERROR}),
}


def can_transition(old: str, new: str) -> bool:
    return ResourceState(new) in TRANSITIONS[ResourceState(old)]


def transition(ctx: ServiceContext, row: Resource, new_state: ResourceState | str, reason: str = "") -> str:
    """Move ``row`` to ``new_state`` in the current transaction; returns the old state.

    Raises :class:`IllegalTransition` for a move the life cycle does not allow.
    Records an event; the state-changed hook fires after commit.
    """
    new = ResourceState(new_state)
    old = row.state
    if old == new.value:
        return old
    if new not in TRANSITIONS[ResourceState(old)]:
        raise IllegalTransition(f"resource {public.resource_label(row)} cannot go from {old} to {new.value}")
    row.state = new.value
    row.state_changed_at = utcnow()
    ctx.session.add(row)
    level = EventLevel.ERROR if new == S.ERROR else EventLevel.INFO
    ctx.record(
        "resource",
        public.resource_label(row),
        f"resource {public.resource_label(row)} {old} -> {new.value}" + (f": {reason}" if reason else ""),
        level=level,
    )

    def notify() -> None:
        ctx.hooks.resource_state_changed(public.one_resource(ctx.session, row), old, ctx.hook_ctx)

    if ctx.hooks.wants("qrm_resource_state_changed"):  # no payload to build for nobody
        ctx.after_commit(notify)
    return old


def find_resource_row(ctx: ServiceContext, ref: str | int) -> Resource:
    """A resource by id, MAC (any notation) or hostname."""
    row: Resource | None = None
    text = str(ref).strip()
    if isinstance(ref, int) or text.isdigit():
        number = int(text)
        row = ctx.session.get(Resource, number) if 0 < number < 2**31 else None
    elif v.looks_like_mac(text):
        row = ctx.session.exec(select(Resource).where(Resource.mac == v.mac(text))).first()
    else:
        row = ctx.session.exec(select(Resource).where(Resource.hostname == text)).first()
    if row is None:
        raise NotFound(f"resource {text!r} does not exist")
    return row


def add_resource(
    ctx: ServiceContext,
    *,
    mac: str,
    ip: str | None = None,
    hostname: str | None = None,
    kind: str = ResourceKind.PHYSICAL.value,
    host: str | None = None,
    hypervisor: str | None = None,
    cpus: int = 0,
    memory_mb: int = 0,
    comment: str | None = None,
) -> ResourcePublic:
    """Enter a machine by hand before it first boots (state ``new``).

    Its agent's registration later fills in what it reports and makes it idle.
    """
    mac = v.mac(mac)
    ip = v.ip(ip) if ip else None
    hostname = v.hostname(hostname)
    kind = kind.strip().lower()
    if kind not in ResourceKind.values():
        raise InvalidInput(f"unknown resource kind {kind!r}; use physical or virtual")
    v.positive(cpus, "CPUs", 0, 4096)
    v.positive(memory_mb, "memory (MB)", 0, 64 * 1024 * 1024)
    comment = v.comment(comment)
    host_row = None
    if host is not None:
        if kind != ResourceKind.VIRTUAL.value:
            raise InvalidInput("only a virtual resource has a host")
        host_row = find_resource_row(ctx, host)
    if hypervisor is not None:
        hypervisor = hypervisor.strip().lower()
        ctx.plugins.hypervisor_driver(hypervisor)
    if ctx.session.exec(select(Resource.id).where(Resource.mac == mac)).first():
        raise AlreadyExists(f"a resource with MAC {mac} already exists")
    if hostname and ctx.session.exec(select(Resource.id).where(Resource.hostname == hostname)).first():
        raise AlreadyExists(f"a resource named {hostname!r} already exists")
    row = Resource(
        mac=mac,
        ip=ip,
        hostname=hostname,
        kind=kind,
        host_id=host_row.id if host_row else None,
        hypervisor=hypervisor,
        cpus=cpus,
        memory_mb=memory_mb,
        comment=comment,
    )
    ctx.session.add(row)
    ctx.record("resource", hostname or mac, f"resource {hostname or mac} added by hand ({kind})")
    ctx.commit()
    result = public.one_resource(ctx.session, row)
    ctx.hooks.resource_added(result, ctx.hook_ctx)
    return result


@dataclass(frozen=True)
class ResourcePage:
    items: list[ResourcePublic]
    total: int
    offset: int
    limit: int | None


def list_resources(
    ctx: ServiceContext,
    *,
    state: str | None = None,
    kind: str | None = None,
    ve: str | None = None,
    offset: int = 0,
    limit: int | None = None,
) -> ResourcePage:
    """Resources by id, optionally filtered, optionally one page of them."""
    query = select(Resource)
    count = select(func.count()).select_from(Resource)
    if state is not None:
        if state not in ResourceState.values():
            raise InvalidInput(f"unknown state {state!r}; use one of {', '.join(ResourceState.values())}")
        query = query.where(Resource.state == state)
        count = count.where(Resource.state == state)
    if kind is not None:
        if kind not in ResourceKind.values():
            raise InvalidInput(f"unknown kind {kind!r}; use physical or virtual")
        query = query.where(Resource.kind == kind)
        count = count.where(Resource.kind == kind)
    if ve is not None:
        ve_row = ctx.session.exec(select(VirtualEnvironment).where(VirtualEnvironment.name == ve)).first()
        if ve_row is None:
            raise NotFound(f"virtual environment {ve!r} does not exist")
        query = query.where(Resource.ve_id == ve_row.id)
        count = count.where(Resource.ve_id == ve_row.id)
    if offset < 0:
        raise InvalidInput("offset must not be negative")
    query = query.order_by(col(Resource.id)).offset(offset)
    if limit is not None:
        if limit < 1 or limit > 100000:
            raise InvalidInput("limit must be between 1 and 100000")
        query = query.limit(limit)
    rows = ctx.session.exec(query).all()
    total = ctx.session.exec(count).one()
    return ResourcePage(items=public.resources(ctx.session, rows), total=total, offset=offset, limit=limit)


def show_resource(ctx: ServiceContext, ref: str | int) -> ResourcePublic:
    return public.one_resource(ctx.session, find_resource_row(ctx, ref))


def resource_health(ctx: ServiceContext, ref: str | int) -> list[HealthCheck]:
    """What monitoring plugins say about a resource."""
    return ctx.hooks.collect_health(show_resource(ctx, ref), ctx.hook_ctx)


def remove_resource(ctx: ServiceContext, ref: str | int) -> ResourcePublic:
    row = find_resource_row(ctx, ref)
    label = public.resource_label(row)
    if row.ve_id is not None:
        ve = ctx.session.get(VirtualEnvironment, row.ve_id)
        raise InUse(
            f"resource {label} serves virtual environment {ve.name if ve else row.ve_id}; "
            "stop the virtual environment first"
        )
    guests = ctx.session.exec(
        select(Resource).where(Resource.host_id == row.id).order_by(col(Resource.id))
    ).all()
    if guests:
        raise InUse(
            f"resource {label} hosts virtual resource(s) {', '.join(public.resource_label(g) for g in guests)}"
        )
    partitions = ctx.session.exec(select(Partition.name).where(Partition.host_id == row.id)).all()
    if partitions:
        raise InUse(f"resource {label} hosts partition(s) {', '.join(partitions)}; remove them first")
    result = public.one_resource(ctx.session, row)
    for partition in ctx.session.exec(select(Partition).where(Partition.resource_id == row.id)):
        partition.resource_id = None
        ctx.session.add(partition)
    ctx.session.delete(row)
    ctx.record("resource", label, f"resource {label} removed")
    ctx.commit()
    ctx.hooks.resource_removed(result, ctx.hook_ctx)
    return result
