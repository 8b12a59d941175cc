"""Resources without an agent: hypervisor hosts another manager knows (ESXi hosts in vCenter).

A plugin that reads such a manager (qrm-vmware's sync) hands core the
complete list of what the manager has, and :func:`sync_managed_hosts` makes
qrm's resources agree with it, in one transaction:

* a host not seen before becomes a resource of kind physical, with the
  plugin's MAC, ``managed_by`` naming the manager, the hypervisor as its
  only capability, its CPUs, memory, free memory and load, and the
  hypervisor URI that reaches it;
* a known host gets its changed facts (events only for what people care
  about: state changes, renames), and its state follows the manager's: idle
  while usable, ``error`` while the manager has lost it, ``off`` while it is
  powered off or in maintenance;
* a host the manager no longer has is **kept**, turned ``off``, and marked
  in its comment; ``qrm resource remove`` forgets it.

A managed resource has no agent: it is never placed into a virtual
environment (it hosts partitions instead) and never times out for want of
heartbeats (``last_seen`` stays empty).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlmodel import col, select

from qrm_core.drivers.base import PARTITION_STATES
from qrm_core.errors import InvalidInput
from qrm_core.models import (
    EventLevel,
    Partition,
    PartitionState,
    Resource,
    ResourceKind,
    ResourcePublic,
    ResourceState,
    utcnow,
)
from qrm_core.services import ServiceContext, public
from qrm_core.services import validation as v
from qrm_core.services.partitions import _observe
from qrm_core.services.resources import transition

S = ResourceState
MANAGER_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}:[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LABEL_BAD = re.compile(r"[^A-Za-z0-9-]+")
USABLE_STATES = (S.IDLE.value, S.ERROR.value, S.OFF.value)


@dataclass(frozen=True)
class ManagedHost:
    """One host as the manager reports it.

    :ivar mac: A stable MAC naming the host in qrm (the plugin derives it).
    :ivar name: The manager's name for it (``esx01.example.com``); qrm's
        hostname is made from it (first label, letters, digits, '-').
    :ivar state: ``idle`` (usable), ``error`` (the manager lost it) or ``off``.
    :ivar reason: Why it is not idle, in one line.
    :ivar free_memory_mb: Memory not in use now (None: unknown).
    :ivar load: CPU use, as a number of busy CPUs.
    :ivar uri: The hypervisor URI that reaches it (the driver's reference).
    :ivar comment: What it is, set when the resource is created.
    """

    mac: str
    name: str
    hypervisor: str
    cpus: int
    memory_mb: int
    uri: str
    state: str = S.IDLE.value
    reason: str = ""
    free_memory_mb: int | None = None
    load: float | None = None
    comment: str = ""


@dataclass
class ManagedSyncReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{len(self.added)} added",
            f"{len(self.changed)} changed",
            f"{len(self.removed)} gone from the manager",
            f"{self.unchanged} unchanged",
        ]
        if self.problems:
            parts.append(f"{len(self.problems)} problem(s): " + "; ".join(self.problems[:3]))
        return ", ".join(parts)


def hostname_for(name: str) -> str:
    """A qrm hostname (one DNS label) from a manager's name for a host."""
    text = name.strip()
    if not re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", text):
        text = text.split(".", 1)[0]
    label = _LABEL_BAD.sub("-", text).strip("-")[:63].strip("-")
    return label or "host"


def _unique_hostname(wanted: str, taken: set[str]) -> str:
    if wanted not in taken:
        return wanted
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = wanted[: 63 - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def list_managed(ctx: ServiceContext, manager: str) -> list[ResourcePublic]:
    """The resources a manager's sync made (``vmware:vc1``)."""
    rows = ctx.session.exec(
        select(Resource).where(Resource.managed_by == manager).order_by(col(Resource.id))
    ).all()
    return public.resources(ctx.session, rows)


def sync_managed_hosts(ctx: ServiceContext, manager: str, hosts: list[ManagedHost]) -> ManagedSyncReport:
    """Make the resources of ``manager`` agree with ``hosts`` (the manager's complete list); commits."""
    if not MANAGER_RE.fullmatch(manager):
        raise InvalidInput(f"invalid manager name {manager!r}: use PLUGIN:NAME (vmware:vc1)")
    report = ManagedSyncReport()
    wanted: dict[str, ManagedHost] = {}
    for host in hosts:
        mac = v.mac(host.mac)
        if host.state not in USABLE_STATES:
            raise InvalidInput(f"state {host.state!r} of managed host {host.name}: use idle, error or off")
        wanted[mac] = host
    mine = {
        row.mac: row for row in ctx.session.exec(select(Resource).where(Resource.managed_by == manager)).all()
    }
    others = (
        {
            row.mac: row
            for row in ctx.session.exec(
                select(Resource).where(col(Resource.mac).in_([m for m in wanted if m not in mine]))
            ).all()
        }
        if any(m not in mine for m in wanted)
        else {}
    )
    taken = {h for h in ctx.session.exec(select(Resource.hostname)).all() if h}
    added: list[Resource] = []
    updated: list[tuple[Resource, list[str]]] = []
    for mac, host in wanted.items():
        row = mine.get(mac)
        if row is None and mac in others:
            other = others[mac]
            report.problems.append(
                f"{host.name}: MAC {mac} belongs to resource {public.resource_label(other)} already"
            )
            continue
        if row is None:
            hostname = _unique_hostname(hostname_for(host.name), taken)
            taken.add(hostname)
            row = Resource(
                mac=mac,
                hostname=hostname,
                kind=ResourceKind.PHYSICAL.value,
                hypervisor=host.hypervisor,
                capabilities=[host.hypervisor],
                cpus=host.cpus,
                memory_mb=host.memory_mb,
                state=host.state,
                managed_by=manager,
                free_memory_mb=host.free_memory_mb,
                load=host.load,
                hypervisor_uri=host.uri,
                comment=v.comment(host.comment[:255]),
            )
            ctx.session.add(row)
            added.append(row)
            ctx.record(
                "resource",
                hostname,
                f"host {host.name} of {manager} added as resource {hostname} ({host.cpus} CPUs, "
                f"{host.memory_mb} MB)"
                + (f", {host.state}: {host.reason}" if host.state != S.IDLE.value else ""),
            )
            report.added.append(hostname)
            continue
        changed: list[str] = []
        for attr, value in (
            ("cpus", host.cpus),
            ("memory_mb", host.memory_mb),
            ("hypervisor", host.hypervisor),
            ("hypervisor_uri", host.uri),
        ):
            if getattr(row, attr) != value:
                setattr(row, attr, value)
                changed.append(attr)
        if list(row.capabilities or []) != [host.hypervisor]:
            row.capabilities = [host.hypervisor]
            changed.append("capabilities")
        quiet = False
        if row.free_memory_mb != host.free_memory_mb or row.load != host.load:
            row.free_memory_mb, row.load = host.free_memory_mb, host.load
            quiet = True  # capacity moves all the time: no event, no hook
        if row.comment.startswith("gone from ") and host.comment:
            row.comment = v.comment(host.comment[:255])  # back in the manager
            changed.append("comment")
        moved = row.state != host.state
        if moved:
            transition(ctx, row, host.state, host.reason or f"reported by {manager}")
        if changed or quiet:
            ctx.session.add(row)
        if changed:
            updated.append((row, changed))
        if changed or moved:
            report.changed.append(public.resource_label(row))
        else:
            report.unchanged += 1
    for mac, row in mine.items():
        if mac in wanted:
            continue
        label = public.resource_label(row)
        if row.comment.startswith("gone from ") and row.state == S.OFF.value:
            continue  # marked before
        if row.state != S.OFF.value:
            transition(ctx, row, S.OFF, f"no longer in {manager}")
        row.comment = f"gone from {manager} since {utcnow():%Y-%m-%d %H:%M} UTC (kept: 'qrm resource remove' forgets it)"[
            :255
        ]
        row.free_memory_mb = None
        ctx.session.add(row)
        ctx.record(
            "resource",
            label,
            f"host {label} is no longer in {manager}: kept, turned off; 'qrm resource remove {label}' forgets it",
            level=EventLevel.WARNING,
        )
        report.removed.append(label)
    ctx.commit()
    if added and ctx.hooks.wants("qrm_resource_added"):
        for row in added:
            ctx.hooks.resource_added(public.one_resource(ctx.session, row), ctx.hook_ctx)
    if updated and ctx.hooks.wants("qrm_resource_updated"):
        for row, fields in updated:
            ctx.hooks.resource_updated(public.one_resource(ctx.session, row), fields, ctx.hook_ctx)
    return report


@dataclass(frozen=True)
class ObservedPartition:
    """A partition as its manager sees it: ``state`` (running, paused,
    stopped) and the hypervisor URI of the host resource it belongs to now."""

    state: str
    host_uri: str


def observe_partitions(
    ctx: ServiceContext, manager: str, seen: dict[str, ObservedPartition], *, complete: bool = True
) -> list[str]:
    """Make the partitions on ``manager``'s hosts agree with what it sees (by MAC); commits.

    A partition whose VM moved (vMotion) follows it to the host resource of
    the new URI, with the virtual resource it became; a state qrm had not
    seen is recorded. With ``complete`` (``seen`` is everything the manager
    has), a partition whose VM the manager no longer has goes to ``error``;
    without it (a few changes the manager announced) only those are looked
    at. Returns one line per change.
    """
    hosts = {
        row.id: row for row in ctx.session.exec(select(Resource).where(Resource.managed_by == manager)).all()
    }
    if not hosts:
        return []
    by_uri = {row.hypervisor_uri: row for row in hosts.values() if row.hypervisor_uri}
    query = select(Partition).where(col(Partition.host_id).in_(list(hosts)))
    if not complete:
        if not seen:
            return []
        query = query.where(col(Partition.mac).in_(list(seen)))
    rows = ctx.session.exec(query.order_by(col(Partition.id))).all()
    changes: list[str] = []
    for partition in rows:
        if partition.state == PartitionState.CREATING.value:
            continue  # the engine is making it
        host = hosts[partition.host_id]
        observed = seen.get(partition.mac)
        if observed is None:
            # Gone: error, and its resource follows (off, or failed over when it serves a VE).
            if _observe(ctx, partition, PartitionState.ERROR.value, f"its VM is gone from {manager}", None):
                changes.append(f"{partition.name} gone")
            continue
        target = by_uri.get(observed.host_uri)
        if target is not None and target.id != partition.host_id:
            clash = ctx.session.exec(
                select(Partition.id).where(Partition.host_id == target.id, Partition.name == partition.name)
            ).first()
            if clash:
                ctx.record(
                    "partition",
                    partition.name,
                    f"partition {partition.name} moved to {public.resource_label(target)} in {manager}, where "
                    "qrm has a partition of that name already: left recorded on "
                    f"{public.resource_label(host)}",
                    level=EventLevel.WARNING,
                )
            else:
                partition.host_id = target.id  # type: ignore[assignment]
                ctx.session.add(partition)
                if partition.resource_id is not None:
                    guest = ctx.session.get(Resource, partition.resource_id)
                    if guest is not None:
                        guest.host_id = target.id
                        ctx.session.add(guest)
                ctx.record(
                    "partition",
                    partition.name,
                    f"partition {partition.name} moved from {public.resource_label(host)} to "
                    f"{public.resource_label(target)} (seen in {manager})",
                )
                changes.append(f"{partition.name} -> {public.resource_label(target)}")
        if observed.state not in PARTITION_STATES:
            raise InvalidInput(
                f"unknown partition state {observed.state!r}; use {', '.join(PARTITION_STATES)}"
            )
        # A state qrm had not seen: recorded as core's partition services do (a
        # paused partition's resource is paused, not failed; a stopped one is off
        # or, serving a VE, failed).
        if _observe(ctx, partition, observed.state, f"seen in {manager}", None):
            changes.append(f"{partition.name} {observed.state}")
    ctx.commit()
    return changes
