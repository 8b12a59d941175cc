"""Resources: the machines qrm boots, and their life cycle.

The allowed state transitions (DESIGN.md section 2) are in :data:`TRANSITIONS`
and nowhere else; :func:`transition` is the only code that changes a
resource's state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlmodel import col, func, select

from qrm_core.drivers.base import HostTarget, PowerTarget
from qrm_core.errors import AlreadyExists, Conflict, IllegalTransition, InUse, InvalidInput, NotFound
from qrm_core.models import (
    MAX_ID,
    EventLevel,
    HealthPublic,
    Partition,
    Resource,
    ResourceDetail,
    ResourceKind,
    ResourceListPublic,
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
    S.IDLE: frozenset({S.ASSIGNED, S.PAUSED, S.ERROR, S.OFF}),
    S.ASSIGNED: frozenset({S.BOOTING, S.IDLE, S.PAUSED, S.ERROR, S.OFF}),
    S.BOOTING: frozenset({S.ACTIVE, S.IDLE, S.PAUSED, S.ERROR, S.OFF}),
    S.ACTIVE: frozenset({S.IDLE, S.BOOTING, S.PAUSED, S.ERROR, S.OFF}),
    # A paused partition is silent but not failed; resumed, it carries on
    # where it was (its next heartbeat says where that is).
    S.PAUSED: frozenset({S.IDLE, S.ASSIGNED, S.BOOTING, S.ACTIVE, S.ERROR, S.OFF}),
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
    number = v.reference_number(ref)
    if number is not None:
        row = ctx.session.get(Resource, number) if 0 < number <= MAX_ID else None
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
    hypervisor_uri: str | None = None,
    network: str | None = None,
) -> ResourcePublic:
    """Enter a machine by hand before it first boots (state ``new``).

    Its agent's registration later fills in what it reports and makes it idle.
    A physical machine given a ``hypervisor`` is a hypervisor host (as
    ``qrm resource set HOST --hypervisor``), reached at ``hypervisor_uri``
    (default: the driver's, from its address) with its partitions on
    ``network``; the driver checks both before anything is recorded.
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
        v.name(hypervisor, "hypervisor")
        ctx.plugins.hypervisor_driver(hypervisor)
    uri = _setting_text(hypervisor_uri, "hypervisor URI", 512) if hypervisor_uri is not None else None
    net = _setting_text(network, "network", 64) if network is not None else None
    if (uri or net) and (kind != ResourceKind.PHYSICAL.value or not hypervisor):
        raise InvalidInput(
            "--hypervisor-uri and --network belong to a hypervisor host: give --hypervisor too"
        )
    if ctx.session.exec(select(Resource.id).where(Resource.mac == mac)).first():
        raise AlreadyExists(f"a resource with MAC {mac} already exists")
    taken = (
        ctx.session.exec(select(Resource.hostname).where(v.same_name(Resource.hostname, hostname))).first()
        if hostname
        else None
    )
    if taken:
        raise AlreadyExists(f"a resource named {taken!r} already exists")
    if hypervisor and kind == ResourceKind.PHYSICAL.value:
        ctx.commit()  # the read ends; the driver checks how it would reach the host
        ctx.plugins.hypervisor_driver(hypervisor).validate_host(
            HostTarget(
                resource_id=0,
                mac=mac,
                address=ip,
                hostname=hostname,
                cpus=cpus,
                memory_mb=memory_mb,
                uri=uri,
                network=net,
            )
        )
    row = Resource(
        mac=mac,
        ip=ip,
        hostname=hostname,
        kind=kind,
        host_id=host_row.id if host_row else None,
        hypervisor=hypervisor,
        hypervisor_uri=uri,
        network=net,
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


def list_resources(
    ctx: ServiceContext,
    *,
    state: str | None = None,
    kind: str | None = None,
    ve: str | None = None,
    host: str | None = None,
    offset: int = 0,
    limit: int | None = None,
) -> ResourceListPublic:
    """Resources by id, optionally filtered (``host``: the virtual resources
    on that host), optionally one page of them."""
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
    if host is not None:
        host_row = find_resource_row(ctx, host)
        query = query.where(Resource.host_id == host_row.id)
        count = count.where(Resource.host_id == host_row.id)
    if offset < 0:
        raise InvalidInput("offset must not be negative")
    query = query.order_by(col(Resource.id)).offset(offset)
    if limit is not None:
        if limit < 1 or limit > 100000:
            raise InvalidInput("limit must be between 1 and 100000")
        query = query.limit(limit)
    rows = ctx.session.exec(query).all()
    total = ctx.session.exec(count).one()
    return ResourceListPublic(
        items=public.resources(ctx.session, rows), total=total, offset=offset, limit=limit
    )


def show_resource(ctx: ServiceContext, ref: str | int) -> ResourcePublic:
    return public.one_resource(ctx.session, find_resource_row(ctx, ref))


#: Host settings whose values are secrets: shown as ``********``.
_SECRET_KEYS = ("password", "secret", "token")


def _shown_settings(settings: dict[str, str] | None) -> dict[str, str]:
    return {
        key: "********" if any(word in key.lower() for word in _SECRET_KEYS) else value
        for key, value in sorted((settings or {}).items())
    }


def resource_detail(ctx: ServiceContext, ref: str | int) -> ResourceDetail:
    """One resource as ``resource show`` shows it: what monitoring plugins say
    about it, how qrm reaches its hypervisor and power controller, and for a
    hypervisor host its partitions and what of its capacity is free."""
    from qrm_core.services.partitions import host_capacity

    row = find_resource_row(ctx, ref)
    resource = public.one_resource(ctx.session, row)
    hosted = ctx.session.exec(
        select(Partition).where(Partition.host_id == row.id).order_by(col(Partition.id))
    ).all()
    partitions = public.partitions(ctx.session, hosted)
    capacity = host_capacity(ctx, row)
    detail = ResourceDetail(
        **resource.model_dump(),
        hypervisor_uri=row.hypervisor_uri,
        network=row.network,
        host_settings=_shown_settings(row.host_settings),
        power_driver=row.power_driver,
        power_address=row.power_address,
        power_username=row.power_username,
        power_password_set=bool(row.power_password),
        partitions=partitions,
        capacity=capacity,
    )
    ctx.commit()  # the read ends before plugins are asked
    health = ctx.hooks.collect_health(resource, ctx.hook_ctx)
    detail.health = [HealthPublic(source=h.source, status=h.status, message=h.message) for h in health]
    return detail


def _setting_text(value: str, what: str, limit: int) -> str | None:
    """A free-text setting (a URI, a network name): printable, one line; empty clears it."""
    value = value.strip()
    if not value:
        return None
    if len(value) > limit or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(f"invalid {what} {value!r}: at most {limit} printable characters on one line")
    return value


def _check_host_settings(settings: dict[str, str]) -> None:
    for key, value in settings.items():
        v.name(key, "host setting name")
        if not isinstance(value, str) or len(value) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise InvalidInput(f"host setting {key}: the value must be at most 255 printable characters")


_UNSET = object()


def set_resource(
    ctx: ServiceContext,
    ref: str | int,
    *,
    hypervisor: str | None = None,
    hypervisor_uri: str | None = None,
    network: str | None = None,
    host_settings: dict[str, str] | None = None,
    power_driver: str | None = None,
    power_address: str | None = None,
    power_username: str | None = None,
    power_password: str | None = None,
) -> ResourceDetail:
    """Set how qrm reaches a machine: the hypervisor a host runs, its URI,
    the network its partitions join, other driver settings (``host_settings``:
    merged; an empty value removes a key), its power controller.

    Only what is given changes; an empty string clears a value (an empty
    ``power_driver`` clears the whole power controller). The drivers concerned
    check the result (``validate_host``, ``validate``) before it is recorded.
    The power password is kept for the driver and never shown, logged or put
    in an event.
    """
    from qrm_core.services.partitions import host_target

    row = find_resource_row(ctx, ref)
    label = public.resource_label(row)
    given = {
        k: val
        for k, val in {
            "hypervisor": hypervisor,
            "hypervisor_uri": hypervisor_uri,
            "network": network,
            "power_driver": power_driver,
            "power_address": power_address,
            "power_username": power_username,
            "power_password": power_password,
        }.items()
        if val is not None
    }
    if not given and not host_settings:
        raise InvalidInput("give at least one setting to change (see 'qrm resource set --help')")
    changes: dict[str, object] = {}
    said: list[str] = []
    if "hypervisor" in given:
        name = given["hypervisor"].strip().lower()
        if row.kind != ResourceKind.PHYSICAL.value:
            raise InvalidInput(
                f"resource {label} is a virtual machine of {row.hypervisor or 'no hypervisor'}; "
                "--hypervisor names what a physical host runs"
            )
        if name:
            v.name(name, "hypervisor")
            ctx.plugins.hypervisor_driver(name)  # an installed driver, or a one-line error
        changes["hypervisor"] = name or None
        said.append(f"hypervisor {name or '(none)'}")
    if "hypervisor_uri" in given:
        changes["hypervisor_uri"] = _setting_text(given["hypervisor_uri"], "hypervisor URI", 512)
        said.append(f"hypervisor URI {changes['hypervisor_uri'] or '(default)'}")
    if "network" in given:
        changes["network"] = _setting_text(given["network"], "network", 64)
        said.append(f"network {changes['network'] or '(default)'}")
    if host_settings:
        _check_host_settings(host_settings)
        merged = dict(row.host_settings or {})
        for key, value in host_settings.items():
            if value:
                merged[key] = value
            else:
                merged.pop(key, None)
        changes["host_settings"] = merged or None
        said.append(
            "host settings "
            + (", ".join(f"{k}={val}" for k, val in _shown_settings(merged).items()) or "(none)")
        )
    power_keys = ("power_driver", "power_address", "power_username", "power_password")
    if any(k in given for k in power_keys):
        if given.get("power_driver", None) == "":
            changes.update(dict.fromkeys(power_keys))
            said.append("no power controller")
        else:
            driver_name = given.get("power_driver", row.power_driver or "").strip().lower()
            if not driver_name:
                raise InvalidInput(f"resource {label} has no power driver; give --power-driver NAME")
            v.name(driver_name, "power driver")
            ctx.plugins.power_driver(driver_name)
            changes["power_driver"] = driver_name
            if "power_address" in given:
                changes["power_address"] = _setting_text(
                    given["power_address"], "power controller address", 255
                )
            if "power_username" in given:
                changes["power_username"] = _setting_text(
                    given["power_username"], "power controller user", 64
                )
            if "power_password" in given:
                secret = given["power_password"]
                if len(secret) > 255 or "\n" in secret:
                    raise InvalidInput(
                        "the power controller password must be one line of at most 255 characters"
                    )
                changes["power_password"] = secret or None
            address = changes.get("power_address", row.power_address)
            user = changes.get("power_username", row.power_username)
            said.append(
                f"power controller {driver_name}"
                + (f" at {address}" if address else "")
                + (f" as {user}" if user else "")
                + (" (password changed)" if "power_password" in given else "")
            )

    # The drivers concerned check the new settings (no transaction open).
    def new(key: str) -> Any:
        return changes[key] if key in changes else getattr(row, key)

    settings = dict(new("host_settings") or {})
    host = replace(host_target(row), uri=new("hypervisor_uri"), network=new("network"), settings=settings)
    hypervisors = set(row.capabilities or []) | ({new("hypervisor")} if new("hypervisor") else set())
    power = new("power_driver")
    target = PowerTarget(
        resource_id=host.resource_id,
        mac=row.mac,
        address=new("power_address"),
        username=new("power_username"),
        password=new("power_password"),
        settings=settings,
    )
    ctx.commit()
    host_keys = {"hypervisor", "hypervisor_uri", "network", "host_settings"}
    if row.kind == ResourceKind.PHYSICAL.value and changes.keys() & host_keys:
        for name in sorted(hypervisors):
            ctx.plugins.hypervisor_driver(name).validate_host(host)
    if power and changes.keys() & {*power_keys, "host_settings"}:
        ctx.plugins.power_driver(power).validate(target)
    row = find_resource_row(ctx, row.id or 0)
    for field, setting in changes.items():
        setattr(row, field, setting)
    ctx.session.add(row)
    ctx.record("resource", label, f"resource {label} set: {'; '.join(said)}")
    ctx.commit()
    result = public.one_resource(ctx.session, row)
    changed = sorted(k for k in changes if k != "power_password") + (
        ["power_password"] if "power_password" in changes else []
    )
    if ctx.hooks.wants("qrm_resource_updated"):
        ctx.hooks.resource_updated(result, changed, ctx.hook_ctx)
    return resource_detail(ctx, row.id or 0)


def mark_failed(
    ctx: ServiceContext,
    ref: str | int,
    *,
    reason: str,
    monitor: str,
    observed_at: datetime | None = None,
) -> ResourcePublic:
    """Take a resource for failed on a monitoring plugin's word (its host is down).

    The resource goes to ``error`` with the reason, as when its heartbeats
    stop, and the engine then fences and replaces it (failover). Allowed only
    for an active member of a virtual environment that asked for it
    (``failover`` and ``monitor_failover``); a resource still booting is left
    to the boot timeout, and an observation older than the resource's current
    state (made during the reboot into the VE) is refused. Anything else is a
    :class:`Conflict` saying why, and nothing changes. A resource already in
    error stays as it is.

    :param reason: What the monitor saw, one line (``host DOWN (hard): PING CRITICAL``).
    :param monitor: Who saw it (the plugin's name); recorded in the event.
    :param observed_at: When the monitor made the observation (its last check).
    """
    reason = v.comment(v.one_line(reason)[:200], "reason")
    monitor = v.name(monitor, "monitor name")
    row = find_resource_row(ctx, ref)
    label = public.resource_label(row)
    if row.state == S.ERROR.value:
        ctx.rollback()
        return public.one_resource(ctx.session, row)
    ve = ctx.session.get(VirtualEnvironment, row.ve_id) if row.ve_id is not None else None
    if ve is None:
        raise Conflict(f"resource {label} serves no virtual environment: nothing to fail over")
    if not (ve.failover and ve.monitor_failover):
        raise Conflict(
            f"virtual environment {ve.name} does not fail over on monitoring "
            f"(qrm ve set {ve.name} --monitor-failover)"
        )
    if row.state != S.ACTIVE.value:
        raise Conflict(
            f"resource {label} is {row.state}, not active: the boot timeout applies, not monitoring"
        )
    if observed_at is not None and observed_at < row.state_changed_at:
        raise Conflict(
            f"the observation of {label} ({observed_at:%Y-%m-%d %H:%M:%S} UTC) is older than its "
            f"current state ({row.state} since {row.state_changed_at:%Y-%m-%d %H:%M:%S} UTC)"
        )
    transition(ctx, row, S.ERROR, f"{monitor}: {reason}")
    ctx.commit()
    return public.one_resource(ctx.session, row)


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


@dataclass(frozen=True)
class ResourceAddress:
    """What a DHCP server needs of a resource."""

    id: int
    mac: str
    ip: str | None
    hostname: str | None


def resource_addresses(ctx: ServiceContext) -> list[ResourceAddress]:
    """``(id, mac, ip, hostname)`` of every resource, by id, in one query.

    For plugins that render a whole configuration (a DHCP server's
    reservations): about 30 times faster than :func:`list_resources`, which
    builds every resource's full public shape. Use a read-only context
    (``service_context(settings, readonly=True)``) from a hook, so the read
    never waits for the write lock of the change that fired the hook.
    """
    rows = ctx.session.exec(
        select(Resource.id, Resource.mac, Resource.ip, Resource.hostname).order_by(col(Resource.id))
    ).all()
    return [ResourceAddress(id=int(rid or 0), mac=mac, ip=ip, hostname=host) for rid, mac, ip, host in rows]


def address_owner(ctx: ServiceContext, ip: str, mac: str, resource_id: int | None = None) -> str | None:
    """The MAC of an earlier resource (a lower id than ``resource_id``; any
    other when None) that has the address ``ip`` too, if any: who keeps an
    address two resources report."""
    query = select(Resource.mac).where(Resource.ip == ip, Resource.mac != mac)
    if resource_id is not None:
        query = query.where(col(Resource.id) < resource_id)
    return ctx.session.exec(query.order_by(col(Resource.id)).limit(1)).first()
