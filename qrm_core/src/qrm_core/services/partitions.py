"""Partitions: VMs on hypervisor hosts, as operators and the engine use them.

Every rule about partitions is here, and nowhere else: a host's capacity
(its CPUs and memory times the overcommit settings), pinning only to CPUs the
host has, migration only between hosts of the same hypervisor with room, an
operation the host's driver does not support refused before anything
changes, pausing a partition that serves a virtual environment only with
``force`` (the VE is then degraded: a paused resource is not failed, and is
not failed over), no removal of a partition that serves a VE.

No driver call runs inside a database transaction. Each operation reads what
it needs into plain values and commits (ending the read; nothing written),
checks the rules, calls the driver, and records the outcome (the partition's
state, its resource's, an event naming who did it) in a new transaction,
then tells plugins (``qrm_partition_*`` hooks). ``add_partitions`` records
the new partitions (state ``creating``) before the driver makes them, so a
server killed in between leaves rows the engine finishes.

A partition's recorded state follows its hypervisor's: through these
operations, through :func:`observe_partition_state` (a plugin reporting a
change made behind qrm's back) and :func:`sync_host` (a sweep of one host).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy import cast, or_
from sqlmodel import col, func, select

from qrm_core.drivers.base import (
    PARTITION_STATES,
    HostTarget,
    HypervisorDriver,
    PartitionInfo,
    PartitionSpec,
    format_pinning,
    parse_pinning,
)
from qrm_core.errors import (
    AlreadyExists,
    Conflict,
    DriverError,
    InUse,
    InvalidInput,
    NotFound,
    QrmError,
)
from qrm_core.models import (
    EventLevel,
    HostCapacity,
    Partition,
    PartitionDetail,
    PartitionPublic,
    PartitionState,
    PartitionSyncPublic,
    Resource,
    ResourceKind,
    ResourceState,
    VirtualEnvironment,
    utcnow,
)
from qrm_core.services import ServiceContext, public
from qrm_core.services import validation as v

P = PartitionState
S = ResourceState
T = TypeVar("T")

#: How a change of size or pinning applies: to the running partition and its
#: definition (``both``), the running partition only (``live``, until it
#: stops), or its definition only (``config``, from its next start).
Mode = Literal["both", "live", "config"]
MODES: tuple[str, ...] = ("both", "live", "config")

MAX_COUNT = 100  # partitions one ``add`` makes
MAX_CPUS = 4096
MAX_MEMORY_MB = 64 * 1024 * 1024
#: Resource states in which a resource's heartbeats are watched.
_WATCHED = (S.IDLE.value, S.ASSIGNED.value, S.BOOTING.value, S.ACTIVE.value)


#: The states a partition may be in for each action (anything else is refused).
FROM_STATES: dict[str, tuple[str, ...]] = {
    "start": (P.STOPPED.value, P.ERROR.value),
    "stop": (P.RUNNING.value, P.PAUSED.value),
    "pause": (P.RUNNING.value,),
    "resume": (P.PAUSED.value,),
    "reboot": (P.RUNNING.value,),
    "resize": (P.RUNNING.value, P.PAUSED.value, P.STOPPED.value),
    "pin": (P.RUNNING.value, P.PAUSED.value, P.STOPPED.value),
    "migrate": (P.RUNNING.value, P.PAUSED.value, P.STOPPED.value),
}
#: The driver's optional operations each action needs (one of them for ``resize``).
NEEDS_OPERATION: dict[str, tuple[str, ...]] = {
    "pause": ("pause_partition",),
    "resume": ("unpause_partition",),
    "reboot": ("reboot_partition",),
    "resize": ("set_vcpus", "set_memory"),
    "pin": ("pin_vcpus",),
    "migrate": ("migrate_partition",),
}


# ---------------------------------------------------------------------------
# Hosts as drivers see them
# ---------------------------------------------------------------------------


def host_target(row: Resource) -> HostTarget:
    """A host resource as hypervisor drivers see it."""
    assert row.id is not None
    return HostTarget(
        resource_id=row.id,
        mac=row.mac,
        address=row.ip,
        hostname=row.hostname,
        cpus=row.cpus,
        memory_mb=row.memory_mb,
        uri=row.hypervisor_uri,
        network=row.network,
        settings=dict(row.host_settings or {}),
    )


def host_hypervisors(row: Resource) -> list[str]:
    """The hypervisors a host runs: what its agent reports, and (a physical
    machine) the one set with ``qrm resource set HOST --hypervisor NAME``."""
    names = set(row.capabilities or [])
    if row.kind == ResourceKind.PHYSICAL.value and row.hypervisor:
        names.add(row.hypervisor)
    return sorted(names)


def runs_hypervisor(row: Resource, hypervisor: str) -> bool:
    return hypervisor in host_hypervisors(row)


def hypervisor_hosts(ctx: ServiceContext, hypervisor: str) -> list[HostTarget]:
    """Every host resource that runs ``hypervisor`` (its agent reports it, or it
    was set with ``--hypervisor``), as its driver sees it; ends the read.

    For a plugin that follows its hypervisor's hosts (a lifecycle watcher,
    every few seconds, on a site of thousands of machines of which few are
    hosts): no driver call, and only the hosts are loaded as objects. The
    columns that decide are read as plain rows first; loading every resource
    cost 50-100 ms per call at 5,000 resources, in the server's process.
    """
    # The database narrows the rows first (a host's reported hypervisors are a
    # JSON list, matched as text: ``"qemu"``), so a site of 25,000 machines
    # with a handful of hosts reads a handful of rows, not 25,000 JSON values;
    # the exact rule is applied to what comes back.
    candidates = or_(
        col(Resource.hypervisor) == hypervisor,
        cast(Resource.capabilities, sa.String).like(f'%"{hypervisor}"%'),
    )
    facts = ctx.session.exec(
        select(Resource.id, Resource.kind, Resource.hypervisor, Resource.capabilities).where(candidates)
    ).all()
    ids = [
        rid
        for rid, kind, declared, reported in facts
        if hypervisor in (reported or ()) or (kind == ResourceKind.PHYSICAL.value and declared == hypervisor)
    ]
    found: list[HostTarget] = []
    for start in range(0, len(ids), 500):
        rows = ctx.session.exec(select(Resource).where(col(Resource.id).in_(ids[start : start + 500]))).all()
        found += [host_target(row) for row in rows if runs_hypervisor(row, hypervisor)]
    ctx.commit()
    return sorted(found, key=lambda host: host.resource_id)


def allocate_mac(ctx: ServiceContext, taken: set[str] | None = None) -> str:
    """A MAC for a new partition, unique site-wide (no resource or partition
    has it, nor any in ``taken``): QEMU's locally administered 52:54:00 prefix."""
    while True:
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        if taken is not None and mac in taken:
            continue
        clash = (
            ctx.session.exec(select(Partition.id).where(Partition.mac == mac)).first()
            or ctx.session.exec(select(Resource.id).where(Resource.mac == mac)).first()
        )
        if not clash:
            return mac


def free_partition_name(ctx: ServiceContext, host_id: int, prefix: str, taken: set[str] | None = None) -> str:
    """``PREFIX-N`` with the lowest N no partition on the host (or in ``taken``) has."""
    used = {n.lower() for n in ctx.session.exec(select(Partition.name).where(Partition.host_id == host_id))}
    used |= {n.lower() for n in taken or ()}
    n = 1
    while f"{prefix[:56]}-{n}".lower() in used:
        n += 1
    return f"{prefix[:56]}-{n}"


def _capacity(ctx: ServiceContext, host: Resource, exclude: int | None = None) -> HostCapacity:
    query = select(
        func.count(),
        func.coalesce(func.sum(Partition.cpus), 0),
        func.coalesce(func.sum(Partition.memory_mb), 0),
    ).where(Partition.host_id == host.id)
    if exclude is not None:
        query = query.where(Partition.id != exclude)
    count, cpus_used, memory_used = ctx.session.exec(query).one()
    cpus_total = int(host.cpus * ctx.settings.cpu_overcommit)
    memory_total = int(host.memory_mb * ctx.settings.memory_overcommit)
    return HostCapacity(
        hypervisors=host_hypervisors(host),
        cpus=host.cpus,
        memory_mb=host.memory_mb,
        cpu_overcommit=ctx.settings.cpu_overcommit,
        memory_overcommit=ctx.settings.memory_overcommit,
        cpus_total=cpus_total,
        memory_total_mb=memory_total,
        partitions=int(count),
        cpus_used=int(cpus_used),
        memory_used_mb=int(memory_used),
        cpus_free=cpus_total - int(cpus_used),
        memory_free_mb=memory_total - int(memory_used),
    )


def host_capacity(ctx: ServiceContext, host: Resource) -> HostCapacity | None:
    """A host's capacity and use, or None for a resource that runs no hypervisor and has no partitions."""
    capacity = _capacity(ctx, host)
    if not capacity.hypervisors and not capacity.partitions:
        return None
    return capacity


def room_problem(
    ctx: ServiceContext,
    host: Resource,
    cpus: int,
    memory_mb: int,
    *,
    count: int = 1,
    exclude: int | None = None,
) -> QrmError | None:
    """Why the host cannot hold ``count`` more partitions of this size (None: it can).

    The one capacity rule, for operators and the engine alike: a partition is
    no bigger than its host, and all of them fit its CPUs and memory times
    the overcommit settings."""
    label = public.resource_label(host)
    if host.cpus < 1 or host.memory_mb < 1:
        return InvalidInput(
            f"host {label} has {host.cpus} CPUs and {host.memory_mb} MB on record: "
            "it must register (or be added with --cpus and --memory) before it takes partitions"
        )
    if cpus > host.cpus:
        return InvalidInput(f"host {label} has {host.cpus} CPUs: a partition cannot have {cpus}")
    if memory_mb > host.memory_mb:
        return InvalidInput(f"host {label} has {host.memory_mb} MB: a partition cannot have {memory_mb} MB")
    room = _capacity(ctx, host, exclude)
    what = f"{count} partitions of" if count > 1 else "a partition of"
    if count * cpus > room.cpus_free:
        return Conflict(
            f"host {label} has {max(room.cpus_free, 0)} of {room.cpus_total} CPUs free "
            f"(overcommit {room.cpu_overcommit:g}): no room for {what} {cpus} CPUs"
        )
    if count * memory_mb > room.memory_free_mb:
        return Conflict(
            f"host {label} has {max(room.memory_free_mb, 0)} of {room.memory_total_mb} MB free "
            f"(overcommit {room.memory_overcommit:g}): no room for {what} {memory_mb} MB"
        )
    return None


def _check_room(
    ctx: ServiceContext,
    host: Resource,
    cpus: int,
    memory_mb: int,
    *,
    count: int = 1,
    exclude: int | None = None,
) -> None:
    """Refuse ``count`` partitions of this size that the host cannot hold."""
    problem = room_problem(ctx, host, cpus, memory_mb, count=count, exclude=exclude)
    if problem is not None:
        raise problem


# ---------------------------------------------------------------------------
# Finding partitions
# ---------------------------------------------------------------------------


def list_partitions(ctx: ServiceContext, host: str | None = None) -> list[PartitionPublic]:
    query = select(Partition).order_by(col(Partition.id))
    if host is not None:
        from qrm_core.services.resources import find_resource_row

        query = query.where(Partition.host_id == find_resource_row(ctx, host).id)
    rows = ctx.session.exec(query).all()
    ctx.commit()  # the read ends here (on SQLite an open one would hold up every writer)
    return public.partitions(ctx.session, rows)


def find_partition_row(ctx: ServiceContext, name: str, host: str | None = None) -> Partition:
    query = select(Partition).where(Partition.name == name)
    if host is not None:
        from qrm_core.services.resources import find_resource_row

        query = query.where(Partition.host_id == find_resource_row(ctx, host).id)
    rows = ctx.session.exec(query).all()
    if not rows:
        raise NotFound(f"partition {name!r} does not exist" + (f" on {host}" if host else ""))
    if len(rows) > 1:
        raise InvalidInput(f"partition {name!r} exists on several hosts; name the host with --host")
    return rows[0]


@dataclass(frozen=True)
class _Read:
    """A partition and what acting on it needs, read before any driver call."""

    id: int
    name: str
    hypervisor: str
    state: str
    cpus: int
    memory_mb: int
    pinning: str
    host_id: int
    host: HostTarget
    resource_id: int | None
    resource: str | None  # its label
    resource_state: str | None
    serves: str | None  # the VE its resource serves

    @property
    def where(self) -> str:
        return f"partition {self.name} on {self.host.label}"


def _read(ctx: ServiceContext, name: str, host: str | None) -> _Read:
    """Read a partition (and its host and resource), then end the read."""
    row = find_partition_row(ctx, name, host)
    host_row = ctx.session.get(Resource, row.host_id)
    assert host_row is not None and row.id is not None
    resource = ctx.session.get(Resource, row.resource_id) if row.resource_id is not None else None
    ve = (
        ctx.session.get(VirtualEnvironment, resource.ve_id)
        if resource is not None and resource.ve_id is not None
        else None
    )
    read = _Read(
        id=row.id,
        name=row.name,
        hypervisor=row.hypervisor,
        state=row.state,
        cpus=row.cpus,
        memory_mb=row.memory_mb,
        pinning=row.cpu_pinning,
        host_id=row.host_id,
        host=host_target(host_row),
        resource_id=resource.id if resource is not None else None,
        resource=public.resource_label(resource) if resource is not None else None,
        resource_state=resource.state if resource is not None else None,
        serves=ve.name if ve is not None else None,
    )
    ctx.commit()  # the read ends here: no transaction stays open across driver calls
    return read


def show_partition(ctx: ServiceContext, name: str, host: str | None = None) -> PartitionDetail:
    """One partition with its resource, the VE that serves, and what its host's driver can do."""
    read = _read(ctx, name, host)
    row = ctx.session.get(Partition, read.id)
    assert row is not None
    shown = public.partitions(ctx.session, [row])[0]
    ctx.commit()  # no transaction open while the driver is asked
    try:
        operations = sorted(ctx.plugins.hypervisor_driver(read.hypervisor).supported_operations(read.host))
    except QrmError:
        operations = []  # the driver is not installed: nothing can be done to it but remove it
    return PartitionDetail(
        **shown.model_dump(),
        resource=read.resource,
        resource_state=read.resource_state,
        serves=read.serves,
        operations=operations,
    )


def offered_actions(detail: PartitionDetail) -> list[str]:
    """The actions a partition's state and its host's driver allow now, in
    :data:`FROM_STATES` order (``remove`` last, unless it serves a VE or is
    being created). What the console offers; every action checks again."""
    offered = [
        action
        for action, states in FROM_STATES.items()
        if detail.state in states
        and (action not in NEEDS_OPERATION or set(NEEDS_OPERATION[action]) & set(detail.operations))
    ]
    if detail.state != P.CREATING.value and detail.serves is None:
        offered.append("remove")
    return offered


def migration_targets(ctx: ServiceContext, name: str, host: str | None = None) -> list[str]:
    """The hosts a partition may be migrated to: the others that run its
    hypervisor and are neither off nor failed (whether it fits is checked when
    it moves: :func:`migrate_partition`)."""
    row = find_partition_row(ctx, name, host)
    candidates = ctx.session.exec(
        select(Resource)
        .where(Resource.id != row.host_id, col(Resource.state).not_in((S.ERROR.value, S.OFF.value)))
        .order_by(col(Resource.id))
    ).all()
    found = [public.resource_label(r) for r in candidates if runs_hypervisor(r, row.hypervisor)]
    ctx.commit()  # the read ends here
    return found


# ---------------------------------------------------------------------------
# Acting: the driver, then the record
# ---------------------------------------------------------------------------


def _driver(ctx: ServiceContext, read: _Read, *operations: str) -> HypervisorDriver:
    """The partition's driver, checked to support the (optional) ``operations`` on its host."""
    driver = ctx.plugins.hypervisor_driver(read.hypervisor)
    supported = driver.supported_operations(read.host) if operations else frozenset()
    for operation in operations:
        if operation not in supported:
            raise driver.unsupported(operation, read.host.label)
    driver.validate_host(read.host)
    return driver


def _call(ctx: ServiceContext, read: _Read, what: str, action: Callable[[], T]) -> T:
    """Run a driver call (no transaction open); a failure is recorded, then raised."""
    try:
        return action()
    except QrmError as exc:
        ctx.record(
            "partition", read.name, f"{what} {read.where} failed: {exc.message}", level=EventLevel.ERROR
        )
        ctx.commit()
        raise


def _refuse_unless(state: str, allowed: Sequence[str], read: _Read, doing: str) -> None:
    if state in allowed:
        return
    if state == P.CREATING.value:
        raise Conflict(f"{read.where} is being created; {doing} it once it is")
    hint = {
        P.PAUSED.value: "; resume it first",
        P.STOPPED.value: "; start it first",
        P.ERROR.value: "; it failed: remove it, or sync its host",
    }.get(state, "")
    raise Conflict(f"cannot {doing} {read.where}: it is {state}{hint}")


def _set_state(ctx: ServiceContext, row: Partition, new: str) -> None:
    """Change a partition's recorded state in the current transaction (the hook after commit)."""
    old = row.state
    if old == new:
        return
    row.state = new
    ctx.session.add(row)
    if ctx.hooks.wants("qrm_partition_state_changed"):
        ctx.after_commit(
            lambda: ctx.hooks.partition_state_changed(
                public.partitions(ctx.session, [row])[0], old, ctx.hook_ctx
            )
        )


def _resource_follows(
    ctx: ServiceContext, row: Partition, state: str, why: str, now: datetime | None = None
) -> None:
    """The partition's resource after its partition became ``state``.

    Paused: ``paused`` (silent, but not failed). Running again after a pause:
    back to ``active`` in its VE (``idle`` without one), its heartbeat clock
    restarting now. Stopped or gone: ``off`` when it serves no VE, ``error``
    when it does (the VE fails over, if it may).
    """
    from qrm_core.services.resources import can_transition, transition

    if row.resource_id is None:
        return
    resource = ctx.session.get(Resource, row.resource_id, populate_existing=True)
    if resource is None:
        return
    if state == P.PAUSED.value:
        target = S.PAUSED if resource.state in _WATCHED else None
    elif state == P.RUNNING.value:
        target = None
        if resource.state == S.PAUSED.value:
            target = S.ACTIVE if resource.ve_id is not None else S.IDLE
            resource.last_seen = now or utcnow()  # its heartbeat clock restarts
    elif resource.ve_id is not None:  # stopped, or gone (error): its VE fails over, if it may
        target = S.ERROR if resource.state in (*_WATCHED, S.PAUSED.value) else None
    else:  # stopped, or gone, serving nothing: off
        target = S.OFF if resource.state in (*_WATCHED, S.PAUSED.value, S.ERROR.value) else None
    if target is not None and resource.state != target.value and can_transition(resource.state, target.value):
        transition(ctx, resource, target, why)
    ctx.session.add(resource)


def _record(
    ctx: ServiceContext,
    read: _Read,
    message: str,
    *,
    state: str | None = None,
    change: Callable[[Partition], None] | None = None,
    why: str = "",
    now: datetime | None = None,
) -> PartitionPublic:
    """Record what a driver call did: the partition's new state (and its
    resource's), other changes, an event. Raises NotFound if the partition
    was removed meanwhile (its hypervisor did act: the event says so)."""
    row = ctx.session.get(Partition, read.id, populate_existing=True, with_for_update=True)
    if row is None:
        ctx.record(
            "partition", read.name, f"{message} (its record was removed meanwhile)", level=EventLevel.WARNING
        )
        ctx.commit()
        raise NotFound(f"partition {read.name!r} was removed while it was being changed")
    if change is not None:
        change(row)
        ctx.session.add(row)
    if state is not None:
        _set_state(ctx, row, state)
        _resource_follows(ctx, row, state, why or message, now)
    ctx.record("partition", row.name, message)
    ctx.commit()
    return public.partitions(ctx.session, [row])[0]


def _degrade(ctx: ServiceContext, read: _Read, what: str) -> None:
    """Record that the VE the partition's resource serves is degraded by what was done to it."""
    if read.serves is not None:
        ctx.record(
            "ve",
            read.serves,
            f"virtual environment {read.serves} degraded: partition {read.name} "
            f"(resource {read.resource}) {what}",
            level=EventLevel.WARNING,
        )


# ---------------------------------------------------------------------------
# Power: start, stop, pause, resume, reboot
# ---------------------------------------------------------------------------


def _as_reported(info: PartitionInfo) -> Callable[[Partition], None]:
    """Record the size and pinning a partition has now (a start applies its definition)."""

    def change(row: Partition) -> None:
        row.cpus, row.memory_mb = info.cpus, info.memory_mb
        row.cpu_pinning = format_pinning(dict(info.cpu_pinning))[:255]

    return change


def _start_and_look(driver: HypervisorDriver, host: HostTarget, name: str) -> PartitionInfo:
    driver.start_partition(host, name)
    return driver.get_partition(host, name)


def start_partition(ctx: ServiceContext, name: str, host: str | None = None) -> PartitionPublic:
    """Power a partition on: it network-boots and registers (an idle resource, or its VE's)."""
    read = _read(ctx, name, host)
    _refuse_unless(read.state, FROM_STATES["start"], read, "start")
    driver = _driver(ctx, read)
    info = _call(ctx, read, "start of", lambda: _start_and_look(driver, read.host, read.name))
    return _record(ctx, read, f"{read.where} started", state=P.RUNNING.value, change=_as_reported(info))


def stop_partition(
    ctx: ServiceContext, name: str, host: str | None = None, *, force: bool = False
) -> PartitionPublic:
    """Power a partition off (``force``: pull the plug at once).

    A partition that serves a virtual environment, or is paused, is stopped
    only with ``force``; its resource is then failed, and its VE fails over
    if it may. A resource that serves none is ``off``.
    """
    read = _read(ctx, name, host)
    _refuse_unless(read.state, FROM_STATES["stop"], read, "stop")
    if read.serves is not None and not force:
        raise InUse(
            f"{read.where} is resource {read.resource}, which serves virtual environment {read.serves}; "
            "stop the virtual environment first (or stop the partition with --force: the VE fails over)"
        )
    if read.state == P.PAUSED.value and not force:
        raise Conflict(f"{read.where} is paused; resume it first, or stop it with --force")
    driver = _driver(ctx, read)
    _call(ctx, read, "stop of", lambda: driver.stop_partition(read.host, read.name, force=force))
    if read.serves is not None:
        _degrade(ctx, read, "stopped on request")
    how = "stopped (forced)" if force else "stopped"
    return _record(ctx, read, f"{read.where} {how}", state=P.STOPPED.value, why=f"its partition was {how}")


def pause_partition(
    ctx: ServiceContext, name: str, host: str | None = None, *, force: bool = False
) -> PartitionPublic:
    """Suspend a running partition in memory.

    Its resource is ``paused``: silent, but not failed, so its VE (if it
    serves one; that needs ``force``) is degraded and not failed over while
    the pause lasts.
    """
    read = _read(ctx, name, host)
    _refuse_unless(read.state, FROM_STATES["pause"], read, "pause")
    if read.serves is not None and not force:
        raise InUse(
            f"{read.where} is resource {read.resource}, which serves virtual environment {read.serves}; "
            "pause it with --force (the VE is degraded while it is paused, and does not fail over)"
        )
    driver = _driver(ctx, read, "pause_partition")
    _call(ctx, read, "pause of", lambda: driver.pause_partition(read.host, read.name))
    _degrade(ctx, read, "paused on request (no failover while it is paused)")
    return _record(ctx, read, f"{read.where} paused", state=P.PAUSED.value)


def resume_partition(
    ctx: ServiceContext, name: str, host: str | None = None, *, now: datetime | None = None
) -> PartitionPublic:
    """Resume a paused partition; its resource's heartbeat clock restarts."""
    read = _read(ctx, name, host)
    _refuse_unless(read.state, FROM_STATES["resume"], read, "resume")
    driver = _driver(ctx, read, "unpause_partition")
    _call(ctx, read, "resume of", lambda: driver.unpause_partition(read.host, read.name))
    if read.serves is not None:
        ctx.record("ve", read.serves, f"partition {read.name} (resource {read.resource}) resumed")
    return _record(ctx, read, f"{read.where} resumed", state=P.RUNNING.value, now=now)


def reboot_partition(ctx: ServiceContext, name: str, host: str | None = None) -> PartitionPublic:
    """Reset a running partition: it boots again from the network (into its VE, if it serves one)."""
    read = _read(ctx, name, host)
    _refuse_unless(read.state, FROM_STATES["reboot"], read, "reboot")
    driver = _driver(ctx, read, "reboot_partition")

    def reboot() -> PartitionInfo:
        driver.reboot_partition(read.host, read.name)
        return driver.get_partition(read.host, read.name)

    info = _call(ctx, read, "reboot of", reboot)

    def rebooted(row: Partition) -> None:
        _as_reported(info)(row)
        # The boot timeout, not the heartbeat timeout, applies until it registers again.
        resource = ctx.session.get(Resource, row.resource_id) if row.resource_id is not None else None
        if resource is not None and resource.last_seen is not None:
            resource.boot_generation += 1
            ctx.session.add(resource)

    return _record(ctx, read, f"{read.where} rebooted", change=rebooted)


# ---------------------------------------------------------------------------
# Size, pinning, migration
# ---------------------------------------------------------------------------


def _live_flags(read: _Read, mode: str, doing: str) -> tuple[bool, bool]:
    """(live, persistent) for a change in ``mode`` to this partition."""
    if mode not in MODES:
        raise InvalidInput(f"unknown mode {mode!r}; use both, live or config")
    running = read.state in (P.RUNNING.value, P.PAUSED.value)
    if mode == "live":
        if not running:
            raise Conflict(f"{read.where} is {read.state}: --live {doing} a running partition; use --config")
        return True, False
    if mode == "config":
        return False, True
    return running, True


def set_partition(
    ctx: ServiceContext,
    name: str,
    host: str | None = None,
    *,
    memory_mb: int | None = None,
    cpus: int | None = None,
    mode: str = "both",
) -> PartitionPublic:
    """Change a partition's memory and/or virtual CPUs (``mode``: both, live, config).

    The new size must fit the host's free capacity; fewer CPUs drop the
    pinning of the CPUs removed.
    """
    if memory_mb is None and cpus is None:
        raise InvalidInput("give --memory MB and/or --cpus N")
    if memory_mb is not None:
        v.positive(memory_mb, "memory (MB)", 1, MAX_MEMORY_MB)
    if cpus is not None:
        v.positive(cpus, "CPUs", 1, MAX_CPUS)
    read = _read(ctx, name, host)
    _refuse_unless(read.state, FROM_STATES["resize"], read, "resize")
    live, persistent = _live_flags(read, mode, "resizes")
    new_cpus = cpus if cpus is not None else read.cpus
    new_memory = memory_mb if memory_mb is not None else read.memory_mb
    operations = [
        op
        for op, changed in (
            ("set_vcpus", new_cpus != read.cpus),
            ("set_memory", new_memory != read.memory_mb),
        )
        if changed
    ]
    if not operations:
        raise Conflict(f"{read.where} has {read.cpus} CPUs and {read.memory_mb} MB already")
    host_row = ctx.session.get(Resource, read.host_id, populate_existing=True)
    assert host_row is not None
    _check_room(ctx, host_row, new_cpus, new_memory, exclude=read.id)
    ctx.commit()
    driver = _driver(ctx, read, *operations)
    if live:
        # A running partition grows only to the maximum it was made with.
        now_info = driver.get_partition(read.host, read.name)
        if now_info.max_cpus is not None and new_cpus > now_info.max_cpus:
            raise Conflict(
                f"{read.where} can have at most {now_info.max_cpus} CPUs while running (its maximum); "
                "change it with --config and restart it"
            )
        if now_info.max_memory_mb is not None and new_memory > now_info.max_memory_mb:
            raise Conflict(
                f"{read.where} can have at most {now_info.max_memory_mb} MB while running (its maximum); "
                "change it with --config and restart it"
            )
    done: list[str] = []
    if "set_vcpus" in operations:
        _call(
            ctx,
            read,
            f"change to {new_cpus} CPUs of",
            lambda: driver.set_vcpus(read.host, read.name, new_cpus, live=live, persistent=persistent),
        )
        done.append(f"{read.cpus} -> {new_cpus} CPUs")
    if "set_memory" in operations:
        _call(
            ctx,
            read,
            f"change to {new_memory} MB of",
            lambda: driver.set_memory(read.host, read.name, new_memory, live=live, persistent=persistent),
        )
        done.append(f"{read.memory_mb} -> {new_memory} MB")
    when = {"live": " (until it stops)", "config": " (from its next start)"}.get(mode, "")

    def resized(row: Partition) -> None:
        # The record says what the partition has now: a change to the
        # definition of a running partition shows from its next start.
        if live or read.state == P.STOPPED.value:
            row.cpus, row.memory_mb = new_cpus, new_memory
            pinning = _pinning(row.cpu_pinning)
            row.cpu_pinning = format_pinning({k: c for k, c in pinning.items() if k < new_cpus})

    return _record(ctx, read, f"{read.where} resized: {', '.join(done)}{when}", change=resized)


def _pinning(text: str) -> dict[int, tuple[int, ...]]:
    """A recorded pinning (``0:2,3;1:4``) back as a mapping."""
    result: dict[int, tuple[int, ...]] = {}
    for item in filter(None, text.split(";")):
        vcpu, _, cpus = item.partition(":")
        result[int(vcpu)] = tuple(int(c) for c in cpus.split(",") if c)
    return result


def pin_partition(
    ctx: ServiceContext, name: str, pinning: str, host: str | None = None, *, mode: str = "both"
) -> PartitionPublic:
    """Pin virtual CPUs to host CPUs (``0:2,3;1:4``: vCPU 0 on CPUs 2 and 3,
    vCPU 1 on CPU 4); virtual CPUs not named keep their pinning. Only CPUs the
    host has."""
    text = (pinning or "").strip()
    if not text:
        raise InvalidInput("give a pinning, VCPU:CPULIST separated by ';', e.g. 0:2,3;1:4")
    read = _read(ctx, name, host)
    _refuse_unless(read.state, FROM_STATES["pin"], read, "pin")
    try:
        wanted = parse_pinning(text, read.cpus, read.host.cpus)
    except ValueError as exc:
        raise InvalidInput(f"invalid pinning {text!r} for {read.where}: {exc}") from None
    merged = {**_pinning(read.pinning), **wanted}
    recorded = format_pinning(merged)
    if len(recorded) > 255:
        raise InvalidInput(f"the pinning of {read.where} would take {len(recorded)} characters; at most 255")
    live, persistent = _live_flags(read, mode, "pins")
    driver = _driver(ctx, read, "pin_vcpus")
    _call(
        ctx,
        read,
        "pinning of",
        lambda: driver.pin_vcpus(read.host, read.name, wanted, live=live, persistent=persistent),
    )

    def pinned(row: Partition) -> None:
        if live or read.state == P.STOPPED.value:
            row.cpu_pinning = recorded

    return _record(ctx, read, f"{read.where} pinned: {format_pinning(wanted)}", change=pinned)


def migrate_partition(
    ctx: ServiceContext,
    name: str,
    to: str,
    host: str | None = None,
    *,
    offline: bool = False,
    now: datetime | None = None,
) -> PartitionPublic:
    """Move a partition to another host of the same hypervisor with room.

    Live (the default) it keeps running throughout; ``offline`` it is moved
    stopped and started again on the destination if it was running. Its
    resource keeps its identity (MAC, id, VE); only its host changes, and its
    pinning, which named the source's CPUs, is dropped.
    """
    from qrm_core.services.resources import find_resource_row

    read = _read(ctx, name, host)
    _refuse_unless(read.state, FROM_STATES["migrate"], read, "migrate")
    live = not offline
    if live and read.state != P.RUNNING.value:
        raise Conflict(f"{read.where} is {read.state}: live migration needs it running; migrate it --offline")
    dest_row = find_resource_row(ctx, to)
    dest_label = public.resource_label(dest_row)
    assert dest_row.id is not None
    if dest_row.id == read.host_id:
        raise InvalidInput(f"{read.where} is on {dest_label} already")
    if not runs_hypervisor(dest_row, read.hypervisor):
        runs = ", ".join(host_hypervisors(dest_row)) or "none"
        raise InvalidInput(
            f"{dest_label} does not run hypervisor {read.hypervisor} (it runs: {runs}); "
            f"a {read.hypervisor} partition moves only between {read.hypervisor} hosts"
        )
    if dest_row.state in (S.ERROR.value, S.OFF.value):
        raise Conflict(f"{dest_label} is {dest_row.state}: it cannot take {read.name}")
    clash = ctx.session.exec(
        select(Partition.id).where(Partition.host_id == dest_row.id, v.same_name(Partition.name, read.name))
    ).first()
    if clash is not None:
        raise AlreadyExists(f"{dest_label} has a partition named {read.name} already")
    _check_room(ctx, dest_row, read.cpus, read.memory_mb)
    destination = host_target(dest_row)
    ctx.commit()
    driver = _driver(ctx, read, "migrate_partition")
    if "migrate_partition" not in driver.supported_operations(destination):
        raise driver.unsupported("migrate_partition", destination.label)
    driver.validate_host(destination)
    moving = time.monotonic()
    _call(
        ctx,
        read,
        f"{'live' if live else 'offline'} migration to {dest_label} of",
        lambda: driver.migrate_partition(read.host, read.name, destination, live=live),
    )
    took = time.monotonic() - moving
    restarted = ""
    state = read.state
    if not live and read.state != P.STOPPED.value:
        # Moved stopped: it runs again where it now lives.
        moved = replace(read, host=destination, host_id=dest_row.id)
        _call(
            ctx,
            moved,
            "restart after the migration of",
            lambda: driver.start_partition(destination, read.name),
        )
        restarted, state = " and started again", P.RUNNING.value
    elif not live:
        state = P.STOPPED.value

    def moved_to(row: Partition) -> None:
        row.host_id = int(dest_row.id or 0)
        row.cpu_pinning = ""  # it named the source's CPUs
        resource = ctx.session.get(Resource, row.resource_id) if row.resource_id is not None else None
        if resource is not None:
            resource.host_id = row.host_id
            if restarted and resource.last_seen is not None:
                resource.boot_generation += 1  # it boots again: the boot timeout applies
            ctx.session.add(resource)

    how = "live" if live else "offline"
    return _record(
        ctx,
        read,
        f"partition {read.name} migrated ({how}) from {read.host.label} to {dest_label}{restarted}; "
        f"the move took {took:.1f} s",
        state=state,
        change=moved_to,
        why=f"its partition moved to {dest_label}",
        now=now,
    )


# ---------------------------------------------------------------------------
# Adding and removing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateJob:
    """A partition recorded as ``creating``, with what its driver needs to make it."""

    partition_id: int
    hypervisor: str
    host: HostTarget
    spec: PartitionSpec


def make_partition(ctx: ServiceContext, job: CreateJob) -> str | None:
    """Create and start a partition on its host (call it with no transaction
    open); the error, or None. Safe to repeat, and safe when another server's
    engine makes the same partition at the same moment: what exists is not
    made again, and a creation that fails because it exists now counts as made."""
    try:
        driver = ctx.plugins.hypervisor_driver(job.hypervisor)
        driver.validate_host(job.host)
        existing = {p.name: p for p in driver.list_partitions(job.host)}
        if job.spec.name not in existing:
            try:
                driver.create_partition(job.host, job.spec)
            except DriverError:
                existing = {p.name: p for p in driver.list_partitions(job.host)}
                if job.spec.name not in existing:
                    raise
        if existing.get(job.spec.name) is None or existing[job.spec.name].state != "running":
            driver.start_partition(job.host, job.spec.name)
    except QrmError as exc:
        return exc.message
    return None


def record_made(ctx: ServiceContext, job: CreateJob, error: str | None) -> Partition | None:
    """Record what :func:`make_partition` did to a ``creating`` partition
    (``running``, or ``error`` with the reason); None if it was finished or
    removed meanwhile."""
    partition = ctx.session.get(Partition, job.partition_id, populate_existing=True)
    if partition is None or partition.state != P.CREATING.value:
        ctx.commit()
        return None
    if error is not None:
        partition.state = P.ERROR.value
        ctx.session.add(partition)
        ctx.record(
            "partition",
            partition.name,
            f"partition {partition.name} on {job.host.label} failed: {error}",
            level=EventLevel.ERROR,
        )
        ctx.commit()
        return partition
    partition.state = P.RUNNING.value
    ctx.session.add(partition)
    ctx.record("partition", partition.name, f"partition {partition.name} started on {job.host.label}")
    ctx.commit()
    if ctx.hooks.wants("qrm_partition_created"):
        ctx.hooks.partition_created(public.partitions(ctx.session, [partition])[0], ctx.hook_ctx)
    return partition


def _choose_hypervisor(host: Resource, hypervisor: str | None) -> str:
    label = public.resource_label(host)
    runs = host_hypervisors(host)
    if hypervisor is not None:
        name = hypervisor.strip().lower()
        if name not in runs:
            raise InvalidInput(
                f"host {label} does not run hypervisor {name} (it runs: {', '.join(runs) or 'none'}); "
                f"set it with 'qrm resource set {label} --hypervisor {name}'"
            )
        return name
    if not runs:
        raise InvalidInput(
            f"host {label} runs no hypervisor (its agent reports none); "
            f"set one with 'qrm resource set {label} --hypervisor NAME'"
        )
    if len(runs) > 1:
        raise InvalidInput(f"host {label} runs {' and '.join(runs)}; name one with --hypervisor")
    return runs[0]


def add_partitions(
    ctx: ServiceContext,
    *,
    host: str,
    cpus: int,
    memory_mb: int,
    count: int = 1,
    hypervisor: str | None = None,
    prefix: str | None = None,
    max_cpus: int | None = None,
    max_memory_mb: int | None = None,
) -> list[PartitionPublic]:
    """Make ``count`` partitions of one size on a host, in one step.

    They network-boot and register as idle virtual resources, ready for any
    VE that asks for a partition of their hypervisor. Each gets a MAC that is
    unique site-wide and a name ``PREFIX-N`` (default prefix: the host's
    name) that no other partition has. While running, a partition can grow to
    ``max_cpus`` (default: the host's CPUs) and ``max_memory_mb`` (default:
    its memory; more needs a change of its definition and a restart). Refused, with nothing changed, when
    the host does not run the hypervisor or cannot hold them all.
    """
    from qrm_core.services.resources import find_resource_row

    v.positive(count, "count", 1, MAX_COUNT)
    v.positive(cpus, "CPUs", 1, MAX_CPUS)
    v.positive(memory_mb, "memory (MB)", 1, MAX_MEMORY_MB)
    if max_cpus is not None:
        v.positive(max_cpus, "maximum CPUs", cpus, MAX_CPUS)
    if max_memory_mb is not None:
        v.positive(max_memory_mb, "maximum memory (MB)", memory_mb, MAX_MEMORY_MB)
    host_row = find_resource_row(ctx, host)
    label = public.resource_label(host_row)
    if prefix is None:
        prefix = (
            host_row.hostname if host_row.hostname and v.NAME_RE.fullmatch(host_row.hostname) else "partition"
        )
    prefix = v.name(prefix, "partition name prefix")
    if len(prefix) > 56:
        raise InvalidInput(f"partition name prefix {prefix!r} is longer than 56 characters")
    name = _choose_hypervisor(host_row, hypervisor)
    _check_room(ctx, host_row, cpus, memory_mb, count=count)
    if max_cpus is not None and max_cpus > host_row.cpus:
        raise InvalidInput(f"host {label} has {host_row.cpus} CPUs: a partition cannot grow to {max_cpus}")
    if max_memory_mb is not None and max_memory_mb > host_row.memory_mb:
        raise InvalidInput(
            f"host {label} has {host_row.memory_mb} MB: a partition cannot grow to {max_memory_mb} MB"
        )
    target = host_target(host_row)
    taken = set(ctx.session.exec(select(Partition.name)).all())
    macs: set[str] = set()
    specs: list[PartitionSpec] = []
    for _ in range(count):
        part_name = free_partition_name(ctx, int(host_row.id or 0), prefix, taken)
        taken.add(part_name)
        mac = allocate_mac(ctx, macs)
        macs.add(mac)
        specs.append(
            PartitionSpec(
                name=part_name,
                cpus=cpus,
                memory_mb=memory_mb,
                mac=mac,
                max_cpus=max(max_cpus or host_row.cpus, cpus),
                max_memory_mb=max_memory_mb,
                network=target.network,
            )
        )
    ctx.commit()  # read done; the driver checks what it will be asked to make
    driver = ctx.plugins.hypervisor_driver(name)
    driver.validate_host(target)
    for spec in specs:
        driver.validate_partition(target, spec)
    # Recorded before anything is made (state ``creating``): a server killed
    # now leaves rows the engine finishes. Room is checked again under a lock
    # on the host, as others may have added partitions meanwhile.
    locked = ctx.session.get(Resource, host_row.id, populate_existing=True, with_for_update=True)
    if locked is None:
        raise NotFound(f"resource {label!r} was removed meanwhile")
    _check_room(ctx, locked, cpus, memory_mb, count=count)
    jobs: list[CreateJob] = []
    for spec in specs:
        assert spec.mac is not None
        row = Partition(
            name=spec.name,
            host_id=int(host_row.id or 0),
            hypervisor=name,
            cpus=cpus,
            memory_mb=memory_mb,
            max_cpus=spec.max_cpus,
            max_memory_mb=spec.max_memory_mb,
            mac=spec.mac,
            state=P.CREATING.value,
        )
        ctx.session.add(row)
        ctx.record(
            "partition", spec.name, f"partition {spec.name} added on {label} ({cpus} CPUs, {memory_mb} MB)"
        )
        ctx.flush()
        assert row.id is not None
        jobs.append(CreateJob(partition_id=row.id, hypervisor=name, host=target, spec=spec))
    ctx.commit()
    made = [(job, make_partition(ctx, job)) for job in jobs]
    for job, error in made:
        record_made(ctx, job, error)  # unless the engine's pass finished it first: that is as good
    results = [
        row
        for row in (ctx.session.get(Partition, job.partition_id, populate_existing=True) for job in jobs)
        if row is not None
    ]
    ctx.commit()  # the read ends here
    failed = [(job.spec.name, error) for job, error in made if error is not None]
    if failed:
        good = [job.spec.name for job, error in made if error is None]
        raise DriverError(
            f"partition {failed[0][0]} could not be made on {label}: {failed[0][1]}"
            + (f" ({len(failed) - 1} more failed)" if len(failed) > 1 else "")
            + (f"; made: {', '.join(good)}" if good else "")
        )
    return public.partitions(ctx.session, results)


def remove_partition(ctx: ServiceContext, name: str, host: str | None = None) -> PartitionPublic:
    """Destroy a partition on its hypervisor and forget it and the virtual
    resource it became. One whose resource serves a VE is not removed.

    Its resource is taken out of use (``off``) before the driver is called, so
    that no VE is given it while it goes.
    """
    from qrm_core.services.resources import can_transition, transition

    row = find_partition_row(ctx, name, host)
    resource = ctx.session.get(Resource, row.resource_id, with_for_update=True) if row.resource_id else None
    if resource is not None and resource.ve_id is not None:
        raise InUse(
            f"partition {name} is resource {public.resource_label(resource)}, which serves a virtual "
            "environment; stop it first"
        )
    if row.state == P.CREATING.value:
        raise Conflict(f"partition {name} is being created; remove it once it is")
    if resource is not None and resource.state != S.OFF.value and can_transition(resource.state, S.OFF.value):
        transition(ctx, resource, S.OFF, f"its partition {name} is being removed")
    ctx.commit()
    read = _read(ctx, name, host)
    try:
        driver = _driver(ctx, read)
        _call(ctx, read, "removal of", lambda: driver.destroy_partition(read.host, read.name))
    except NotFound:
        pass  # already gone on the hypervisor: forget it here too
    gone = ctx.session.get(Partition, read.id, populate_existing=True)
    if gone is None:
        raise NotFound(f"partition {name!r} was removed meanwhile")
    resource = (
        ctx.session.get(Resource, gone.resource_id, populate_existing=True) if gone.resource_id else None
    )
    result = public.partitions(ctx.session, [gone])[0]
    resource_result = public.one_resource(ctx.session, resource) if resource is not None else None
    ctx.session.delete(gone)
    if resource is not None:
        ctx.session.flush()
        ctx.session.delete(resource)
        ctx.record("resource", public.resource_label(resource), f"virtual resource {resource.mac} removed")
    ctx.record("partition", name, f"partition {name} destroyed on {read.host.label}")
    ctx.commit()
    ctx.hooks.partition_removed(result, ctx.hook_ctx)
    if resource_result is not None:
        ctx.hooks.resource_removed(resource_result, ctx.hook_ctx)
    return result


# ---------------------------------------------------------------------------
# What hypervisors say
# ---------------------------------------------------------------------------


def _host_row(ctx: ServiceContext, host: Resource | int | str) -> Resource:
    from qrm_core.services.resources import find_resource_row

    if isinstance(host, Resource):
        return host
    return find_resource_row(ctx, host)


def _observe(ctx: ServiceContext, row: Partition, state: str, why: str, now: datetime | None) -> str | None:
    """Record that a partition is ``state`` on its hypervisor (current transaction); what changed, if anything."""
    old = row.state
    if old == state or old == P.CREATING.value:
        return None
    _set_state(ctx, row, state)
    _resource_follows(ctx, row, state, why, now)
    level = EventLevel.ERROR if state == P.ERROR.value else EventLevel.INFO
    message = f"partition {row.name} {old} -> {state}: {why}"
    ctx.record("partition", row.name, message, level=level)
    return message


def observe_partition_state(
    ctx: ServiceContext,
    host_id: int,
    name: str,
    state: str,
    reason: str = "",
    *,
    now: datetime | None = None,
) -> PartitionPublic | None:
    """Record a partition state its hypervisor reports, changed behind qrm's
    back (a plugin watching its hypervisor's events calls this).

    ``state`` is running, paused or stopped. The partition's resource follows
    as if qrm had done it (paused: not failed; stopped: off, or failed when it
    serves a VE). Returns the partition, or None when qrm does not know it
    (that is recorded as a warning). Calls no driver.
    """
    if state not in PARTITION_STATES:
        raise InvalidInput(f"unknown partition state {state!r}; use {', '.join(PARTITION_STATES)}")
    host_row = _host_row(ctx, host_id)
    label = public.resource_label(host_row)
    why = v.comment(reason[:200].replace("\n", " "), "reason") or f"reported by hypervisor on {label}"
    row = ctx.session.exec(
        select(Partition).where(Partition.host_id == host_row.id, Partition.name == name)
    ).first()
    if row is None:
        ctx.record(
            "resource",
            label,
            f"host {label} reports partition {name!r} {state}, which qrm does not know: {why}",
            level=EventLevel.WARNING,
        )
        ctx.commit()
        return None
    _observe(ctx, row, state, why, now)
    ctx.commit()
    return public.partitions(ctx.session, [row])[0]


def sync_host(
    ctx: ServiceContext, host: Resource | int | str, *, now: datetime | None = None
) -> PartitionSyncPublic:
    """Reconcile qrm's records of a host's partitions with what its hypervisor lists.

    Read the records and commit; ask each hypervisor the host runs
    partitions of (``list_partitions``); record what differs: a state (the
    resource follows), a size, a pinning, a partition gone (``error``: lost),
    and partitions qrm did not make (a warning each; they are not adopted).
    Partitions being created are left to whoever creates them.
    """
    host_row = _host_row(ctx, host)
    label = public.resource_label(host_row)
    target = host_target(host_row)
    rows = ctx.session.exec(
        select(Partition).where(Partition.host_id == host_row.id).order_by(col(Partition.id))
    ).all()
    hypervisors = sorted({r.hypervisor for r in rows} | set(host_hypervisors(host_row)))
    ctx.commit()
    reports: dict[str, dict[str, PartitionInfo]] = {}
    for name in hypervisors:
        driver = ctx.plugins.hypervisor_driver(name)
        driver.validate_host(target)
        reports[name] = {p.name: p for p in driver.list_partitions(target)}
    changes: list[str] = []
    known: set[str] = set()
    for stale in rows:
        row = ctx.session.get(Partition, stale.id, populate_existing=True, with_for_update=True)
        if row is None or row.host_id != host_row.id or row.state == P.CREATING.value:
            continue
        known.add(row.name)
        info = reports.get(row.hypervisor, {}).get(row.name)
        if info is None:
            change = _observe(ctx, row, P.ERROR.value, f"it is gone from {label}", now)
            if change:
                changes.append(change)
            continue
        if info.state in PARTITION_STATES:
            change = _observe(ctx, row, info.state, f"as {label} reports", now)
            if change:
                changes.append(change)
        size = (info.cpus, info.memory_mb)
        pinning = format_pinning(dict(info.cpu_pinning))
        if (row.cpus, row.memory_mb) != size or row.cpu_pinning != pinning[:255]:
            message = (
                f"partition {row.name} is {size[0]} CPUs, {size[1]} MB"
                + (f", pinned {pinning}" if pinning else "")
                + f" on {label} (recorded: {row.cpus} CPUs, {row.memory_mb} MB"
                + (f", pinned {row.cpu_pinning}" if row.cpu_pinning else "")
                + ")"
            )
            row.cpus, row.memory_mb, row.cpu_pinning = size[0], size[1], pinning[:255]
            ctx.session.add(row)
            ctx.record("partition", row.name, message)
            changes.append(message)
    unknown = sorted({n for report in reports.values() for n in report} - known - {r.name for r in rows})
    for name in unknown:
        ctx.record(
            "resource",
            label,
            f"host {label} has partition {name}, which qrm did not make (not adopted)",
            level=EventLevel.WARNING,
        )
    ctx.commit()
    return PartitionSyncPublic(host=label, changes=changes, unknown=unknown)


#: What ``qrm partition start|stop|pause|resume|reboot`` do.
ACTIONS: dict[str, Callable[..., PartitionPublic]] = {
    "start": start_partition,
    "stop": stop_partition,
    "pause": pause_partition,
    "resume": resume_partition,
    "reboot": reboot_partition,
}


def partition_action(
    ctx: ServiceContext, name: str, action: str, host: str | None = None, *, force: bool = False
) -> PartitionPublic:
    """Start, stop, pause, resume or reboot a partition (``force`` goes with stop and pause)."""
    operation = ACTIONS.get(action)
    if operation is None:
        raise InvalidInput(f"unknown partition action {action!r}; use {', '.join(ACTIONS)}")
    if action in ("stop", "pause"):
        return operation(ctx, name, host, force=force)
    if force:
        raise InvalidInput(f"--force goes with stop and pause, not {action}")
    return operation(ctx, name, host)
