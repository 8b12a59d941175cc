"""The node-agent protocol's rules: registration and heartbeats (docs/agent-protocol.md).

A machine proves who it is with the site's enrollment token once (register),
then with its per-resource token (heartbeat). The boot generation decides
whether what an agent says is about the current boot: a reboot ordered by qrm
raises the resource's generation, and an agent reporting a lower one is the
OS that was running before; it is told to reboot again and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from pydantic_core import PydanticUndefined
from sqlmodel import select

from qrm_core.errors import AuthError, Conflict, InvalidInput, NotFound, QrmError
from qrm_core.models import (
    EventLevel,
    Partition,
    Resource,
    ResourceKind,
    ResourcePublic,
    ResourceState,
    VEDesiredState,
    VirtualEnvironment,
    utcnow,
)
from qrm_core.services import ServiceContext, public
from qrm_core.services import validation as v
from qrm_core.services.resources import transition

if TYPE_CHECKING:
    from qrm_core.services.storage import VolumeAccess

S = ResourceState
LIVE_STATES = (S.IDLE.value, S.ASSIGNED.value, S.BOOTING.value, S.ACTIVE.value)


def hash_token(token: str) -> str:
    """Per-resource tokens are 256-bit random strings: SHA-256 is enough (and fast)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Registration:
    resource_id: int
    token: str
    heartbeat_interval: float
    state: str
    boot_generation: int
    #: Non-empty: the machine must not mount its VE's root yet (its VE is being
    #: reset and its image reverted); the agent asks again in a second.
    hold: str = ""


@dataclass(frozen=True)
class HeartbeatAnswer:
    command: Literal["none", "reboot", "halt"]
    heartbeat_interval: float
    boot_generation: int


def _order_reboot(ctx: ServiceContext, row: Resource, why: str) -> None:
    """Raise the boot generation: the next heartbeat of the running OS gets ``reboot``."""
    row.boot_generation += 1
    ctx.session.add(row)
    ctx.record("resource", public.resource_label(row), f"reboot ordered: {why}")


def release(ctx: ServiceContext, row: Resource, reason: str, *, reboot: bool) -> None:
    """Detach a resource from its VE in the current transaction.

    After commit, the resource's access to the VE's filesystem image is
    withdrawn through the storage driver (what it needs is read now, so the
    driver is called with no transaction open) and the hooks are told.
    """
    from qrm_core.services.storage import volume_access

    ve = ctx.session.get(VirtualEnvironment, row.ve_id) if row.ve_id is not None else None
    if ve is None:
        return
    ve_public = public.one_ve(ctx.session, ve)
    try:
        access: VolumeAccess | None = volume_access(ctx, ve.id or 0, row)
        failure = ""
    except QrmError as exc:  # its storage driver is gone or disabled
        access, failure = None, exc.message
    if row.state in (S.ASSIGNED.value, S.BOOTING.value, S.ACTIVE.value, S.PAUSED.value):
        transition(ctx, row, S.IDLE, reason)
    row.ve_id = None
    if reboot:
        _order_reboot(ctx, row, reason)
    ctx.session.add(row)
    ctx.record("ve", ve.name, f"resource {public.resource_label(row)} released: {reason}")

    def withdraw() -> None:
        nonlocal failure
        if ctx.session.in_transaction():
            ctx.session.commit()  # the storage driver is called with no transaction open
        if access is not None:
            try:
                access.withdraw()
            except QrmError as exc:
                failure = exc.message
        if failure:
            ctx.record(
                "ve",
                ve_public.name,
                f"could not withdraw {public.resource_label(row)}'s access to the filesystem image: {failure}",
                level=EventLevel.ERROR,
            )
            ctx.commit()
        ctx.hooks.ve_resource_released(ve_public, public.one_resource(ctx.session, row), ctx.hook_ctx)

    ctx.after_commit(withdraw)


# Built once: building a statement costs more than running it from SQLAlchemy's cache.
_RESOURCE_BY_MAC = select(Resource).where(Resource.mac == sa.bindparam("mac"))
_PARTITION_BY_MAC = select(Partition).where(Partition.mac == sa.bindparam("mac"))
_HOSTNAME_TAKEN = select(Resource.id).where(Resource.hostname == sa.bindparam("hostname"))
_RESOURCE_TABLE: sa.Table = Resource.__table__  # type: ignore[attr-defined]
_PARTITION_TABLE: sa.Table = Partition.__table__  # type: ignore[attr-defined]
_FIRST_SIGHT = sa.select(
    sa.select(_RESOURCE_TABLE.c.id).where(_RESOURCE_TABLE.c.mac == sa.bindparam("mac")).scalar_subquery(),
    sa.select(_PARTITION_TABLE.c.id).where(_PARTITION_TABLE.c.mac == sa.bindparam("mac")).scalar_subquery(),
    sa.select(_RESOURCE_TABLE.c.id)
    .where(_RESOURCE_TABLE.c.hostname == sa.bindparam("hostname"))
    .limit(1)
    .scalar_subquery(),
)
_INSERT_RESOURCE = sa.insert(_RESOURCE_TABLE)


class RegistrationRefused(Conflict):
    """A second registration of a MAC whose agent is alive (see :func:`may_register_again`)."""


#: A machine's agent counts as gone quiet once it has not been heard for this
#: many heartbeat intervals (an agent heartbeats once per interval; the half
#: interval more covers a slow request, not a reboot).
QUIET_INTERVALS = 1.5


def may_register_again(
    row: Resource, *, boot_generation: int, proof: str | None, now: datetime, heartbeat_interval: float
) -> str | None:
    """Why a registration of ``row``'s MAC is refused now, or None when it may register.

    The machine keeps its identity while its agent is alive: the enrollment
    token (which every boot script carries) must not let anyone else take its
    per-resource token. A registration is let through when

    * it proves to be that agent (``proof``: the resource's current token;
      the agent registers again when what it reports changes), or
    * qrm told the machine to reboot and this is the boot it ordered (the
      resource's boot generation is ahead of the boot it last registered,
      and the registration carries that generation), or
    * the agent has gone quiet for ``QUIET_INTERVALS`` heartbeat intervals (a
      reboot qrm did not order, a power cut, a crashed agent), or was never heard.
    """
    if row.token_hash is None or row.last_seen is None:
        return None
    if proof and hmac.compare_digest(row.token_hash, hash_token(proof)):
        return None
    if row.boot_generation > row.booted_generation and boot_generation == row.boot_generation:
        return None
    quiet = (now - row.last_seen).total_seconds()
    if quiet > heartbeat_interval * QUIET_INTERVALS:
        return None
    return f"its agent is alive (heard {max(quiet, 0):.0f} s ago)"


def register(ctx: ServiceContext, **kwargs: Any) -> Registration:
    """Register (or re-register) the machine with this MAC; idempotent per MAC.

    A machine whose agent is alive keeps its identity: another registration
    of its MAC is refused (:class:`RegistrationRefused`, recorded as an event
    naming ``source``, the address it came from) unless :func:`may_register_again`
    lets it through.

    Two registrations of a new MAC at the same moment (a machine retrying)
    race to insert it; the loser sees the winner's row on a second try.
    """
    for attempt in range(3):
        try:
            return _register(ctx, **kwargs)
        except RegistrationRefused:
            raise
        except Conflict:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _register(
    ctx: ServiceContext,
    *,
    mac: str,
    ip: str | None,
    cpus: int,
    memory_mb: int,
    hostname: str | None = None,
    hypervisors: list[str] | None = None,
    boot_generation: int = 0,
    mode: Literal["idle", "ve"] = "idle",
    ve: str | None = None,
    now: datetime | None = None,
    source: str | None = None,
    proof: str | None = None,
    stage: str | None = None,
) -> Registration:
    mac = v.mac(mac)
    ip = v.ip(ip) if ip else None
    hostname = v.hostname(hostname)
    v.positive(cpus, "cpus", 0, 4096)
    v.positive(memory_mb, "memory_mb", 0, 64 * 1024 * 1024)
    capabilities = sorted({v.name(h, "hypervisor").lower() for h in hypervisors or []})
    if mode not in ("idle", "ve"):
        raise InvalidInput("mode must be idle or ve")
    if stage not in (None, "initrd", "ve"):
        raise InvalidInput("stage must be initrd or ve")
    if boot_generation < 0:
        raise InvalidInput("boot_generation must not be negative")
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    if mode == "idle":
        first = _register_first_sight(
            ctx, mac, ip, hostname, cpus, memory_mb, capabilities, boot_generation, token, now
        )
        if first is not None:
            return first
    row = ctx.session.exec(_RESOURCE_BY_MAC, params={"mac": mac}).first()
    if row is not None:
        refused = may_register_again(
            row,
            boot_generation=boot_generation,
            proof=proof,
            now=now,
            heartbeat_interval=ctx.settings.heartbeat_interval,
        )
        if refused is not None:
            label = public.resource_label(row)
            ctx.record(
                "resource",
                label,
                f"registration of {mac} from {source or 'an unknown address'} refused: {refused}",
                level=EventLevel.WARNING,
            )
            ctx.commit()
            raise RegistrationRefused(
                f"resource {label} is registered and {refused}: another registration of its MAC is "
                "refused until qrm orders it to reboot or it stops heartbeating"
            )
    created = row is None
    changed: list[str] = []
    partition: Partition | None = None
    if row is None:
        partition = ctx.session.exec(_PARTITION_BY_MAC, params={"mac": mac}).first()
        # The fields with default factories given here: pydantic inspects a
        # factory's signature on every call (~0.1 ms for these three).
        stamp = utcnow()
        row = Resource(
            mac=mac,
            kind=ResourceKind.PHYSICAL.value,
            capabilities=[],
            state_changed_at=stamp,
            created_at=stamp,
        )
        if partition is not None:
            row.kind = ResourceKind.VIRTUAL.value
            row.host_id = partition.host_id
            row.hypervisor = partition.hypervisor
        if hostname and ctx.session.exec(_HOSTNAME_TAKEN, params={"hostname": hostname}).first():
            hostname = None  # a clash with another machine's name: keep the MAC as its label
        row.hostname = hostname
    for field, value in (
        ("ip", ip),
        ("cpus", cpus),
        ("memory_mb", memory_mb),
        ("capabilities", capabilities),
    ):
        if getattr(row, field) != value:
            setattr(row, field, value)
            changed.append(field)
    row.token_hash = hash_token(token)
    row.last_seen = now
    ctx.session.add(row)
    if created:
        ctx.record("resource", public.resource_label(row), f"resource {row.mac} registered ({row.kind})")
        if partition is not None and partition.resource_id is None:
            ctx.flush()  # the new row's id
            partition.resource_id = row.id
            ctx.session.add(partition)

    hold = ""
    if boot_generation >= row.boot_generation:
        # A higher generation than recorded: booted from an earlier record of
        # this MAC (removed and registered again); continue from there.
        row.boot_generation = boot_generation
        row.booted_generation = boot_generation
        _apply_boot(ctx, row, mode, ve)
        if mode == "ve":
            hold = _reset_hold(ctx, row, stage)
    # else: the OS of an earlier boot; its next heartbeat is told to reboot.
    # A new row is inserted here, already in its state after the boot (no
    # separate UPDATE); its events keep their order.
    ctx.commit()
    hook = "qrm_resource_added" if created else "qrm_resource_updated" if changed else None
    if hook is not None and ctx.hooks.wants(hook):
        result = public.one_resource(ctx.session, row)
        if created:
            ctx.hooks.resource_added(result, ctx.hook_ctx)
        else:
            ctx.hooks.resource_updated(result, changed, ctx.hook_ctx)
    assert row.id is not None
    return Registration(
        resource_id=row.id,
        token=token,
        heartbeat_interval=ctx.settings.heartbeat_interval,
        state=row.state,
        boot_generation=row.boot_generation,
        hold=hold,
    )


def _reset_hold(ctx: ServiceContext, row: Resource, stage: str | None) -> str:
    """What a machine booting into its VE hears while the VE is being reset
    (``VirtualEnvironment.reset_phase``, :func:`qrm_core.services.images.reset_ve`):
    wait, its image is not reverted yet. Registering from the initrd, before the
    root is mounted (``stage`` "initrd"), is the proof that the machine's old OS is
    down; an agent that registers only after it mounted the root (a boot image
    built before the hold existed) has mounted the old image while the reset waits
    to revert it: it is rebooted (held in its boot script while the image is
    reverted) and the event says to rebuild its boot image."""
    ve = ctx.session.get(VirtualEnvironment, row.ve_id) if row.ve_id is not None else None
    if ve is None or not ve.reset_phase or ve.desired_state != VEDesiredState.RUNNING.value:
        return ""
    if stage == "initrd":
        what = (
            "reverting its image" if ve.reset_phase == "reverting" else "waiting for its machines to reboot"
        )
        return f"virtual environment {ve.name} is resetting: {what}"
    _order_reboot(
        ctx,
        row,
        f"booted {ve.name} without waiting for its reset (its boot image's agent does not hold; "
        "rebuild the boot image)",
    )
    return ""


def _register_first_sight(
    ctx: ServiceContext,
    mac: str,
    ip: str | None,
    hostname: str | None,
    cpus: int,
    memory_mb: int,
    capabilities: list[str],
    boot_generation: int,
    token: str,
    now: datetime,
) -> Registration | None:
    """The most common registration, written without the ORM: a MAC qrm has
    never seen (no resource, no partition) booting the idle image. It becomes
    an idle physical resource, with the same row and the same two events the
    general rule in :func:`_register` makes (tests/core/test_fast_paths.py
    checks that they agree). Returns None, having written nothing, for every
    other case.

    Registrations come in bursts (a rack powering on); this path costs about
    half the CPU of the general one (bench/server).
    """
    conn = ctx.session.connection()
    known, partition, clash = conn.execute(_FIRST_SIGHT, {"mac": mac, "hostname": hostname}).one()
    if known is not None or partition is not None:
        return None
    if clash is not None:
        hostname = None  # as in _register: the MAC stays the label
    label = hostname or mac
    stamp = utcnow()
    values = {
        "mac": mac,
        "ip": ip,
        "hostname": hostname,
        "kind": ResourceKind.PHYSICAL.value,
        "capabilities": capabilities,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "state": S.IDLE.value,
        "boot_generation": boot_generation,
        "booted_generation": boot_generation,
        "token_hash": hash_token(token),
        "last_seen": now,
        "state_changed_at": stamp,
        "created_at": stamp,
    }
    try:
        inserted = conn.execute(_INSERT_RESOURCE, values).inserted_primary_key
        assert inserted is not None
        resource_id = int(inserted[0])
    except sa.exc.IntegrityError:
        # The same MAC registering twice at once: the general rule sorts it out.
        ctx.rollback()
        raise Conflict(f"resource {mac} registered concurrently") from None
    ctx.record_fast(
        "resource",
        [
            (label, f"resource {mac} registered ({ResourceKind.PHYSICAL.value})"),
            (label, f"resource {label} {S.NEW.value} -> {S.IDLE.value}: registered"),
        ],
    )
    ctx.commit()
    if ctx.hooks.wants("qrm_resource_added") or ctx.hooks.wants("qrm_resource_state_changed"):
        # What the hooks get is built from the row just inserted, not read
        # back: reading it was one more transaction (on SQLite one more turn
        # of the write lock) per registration with any plugin installed.
        result = _new_resource_public(resource_id, values)
        ctx.hooks.resource_added(result, ctx.hook_ctx)
        ctx.hooks.resource_state_changed(result, S.NEW.value, ctx.hook_ctx)
    return Registration(
        resource_id=resource_id,
        token=token,
        heartbeat_interval=ctx.settings.heartbeat_interval,
        state=S.IDLE.value,
        boot_generation=boot_generation,
    )


def _new_resource_public(resource_id: int, values: dict[str, Any]) -> ResourcePublic:
    """The public view of a resource row just inserted with ``values`` (no host,
    no VE): the columns not given have their defaults, as in the database
    (tests/core/test_fast_paths.py checks it against the row read back)."""
    defaults = _PUBLIC_DEFAULTS or _public_defaults()
    # Every field is given, from values _register_first_sight validated and wrote.
    fields = {**defaults, **{k: v for k, v in values.items() if k in ResourcePublic.model_fields}}
    fields["id"] = resource_id
    fields["capabilities"] = list(values["capabilities"])
    return ResourcePublic.model_construct(**fields)


_PUBLIC_DEFAULTS: dict[str, Any] = {}


def _public_defaults() -> dict[str, Any]:
    """ResourcePublic's fields that a first registration does not set, with the Resource defaults."""
    for name in ResourcePublic.model_fields:
        field = Resource.model_fields.get(name)
        if field is None:  # host, ve: names of related rows, none for a new machine
            _PUBLIC_DEFAULTS[name] = None
        elif field.default_factory is None and field.default is not PydanticUndefined:
            _PUBLIC_DEFAULTS[name] = field.default
    return _PUBLIC_DEFAULTS


def _apply_boot(ctx: ServiceContext, row: Resource, mode: str, ve_name: str | None) -> None:
    """What a boot of the current generation means for the resource's state."""
    ve = ctx.session.get(VirtualEnvironment, row.ve_id) if row.ve_id is not None else None
    if mode == "idle":
        if ve is not None:
            if ve.desired_state == VEDesiredState.RUNNING.value and row.state == S.ASSIGNED.value:
                # Assigned, but booted the idle image (the boot began before the
                # assignment): order the reboot into the VE again.
                _order_reboot(ctx, row, f"must boot into virtual environment {ve.name}")
                return
            release(ctx, row, "booted the idle image", reboot=False)
        if row.state != S.IDLE.value:
            transition(ctx, row, S.IDLE, "registered")
        return
    # mode == "ve"
    if ve is None or ve.desired_state != VEDesiredState.RUNNING.value or (ve_name and ve_name != ve.name):
        if ve is not None:
            release(ctx, row, "booted a virtual environment it no longer serves", reboot=True)
        else:
            if row.state != S.IDLE.value:
                transition(ctx, row, S.IDLE, "booted a virtual environment it does not serve")
            _order_reboot(ctx, row, "booted a virtual environment it does not serve")
        return
    if row.state in (S.ASSIGNED.value, S.ERROR.value):
        transition(ctx, row, S.BOOTING, f"booting virtual environment {ve.name}")


def authenticate_resource(ctx: ServiceContext, resource_id: int, token: str | None) -> Resource:
    row = ctx.session.get(Resource, resource_id)
    if row is None or row.token_hash is None or not token:
        raise AuthError("unknown resource or wrong token")
    if not hmac.compare_digest(row.token_hash, hash_token(token)):
        raise AuthError("unknown resource or wrong token")
    return row


def heartbeat(
    ctx: ServiceContext,
    *,
    resource_id: int,
    token: str | None,
    state: Literal["idle", "active", "failed", "filling"],
    load: float | None = None,
    boot_generation: int = 0,
    reason: str | None = None,
    now: datetime | None = None,
    fill_bytes: int | None = None,
    fill_total: int | None = None,
    fill_device: str | None = None,
    fill_result: Literal["done", "failed"] | None = None,
) -> HeartbeatAnswer:
    """Record a heartbeat and answer with the command for the machine.

    ``failed`` is an agent saying it cannot do its job (the VE's root cannot be
    fetched, ...): the resource goes to ``error`` at once, with the reason, so
    failover need not wait for the heartbeat timeout. ``filling`` (and ``failed``
    with ``fill_result``) is a booting machine filling its VE's image from its local
    disk (:func:`qrm_core.services.local_fill.fill_heartbeat`).
    """
    if state not in ("idle", "active", "failed", "filling"):
        raise InvalidInput("state must be idle, active, failed or filling")
    if fill_result not in (None, "done", "failed"):
        raise InvalidInput("fill_result must be done or failed")
    if (fill_result == "failed" and state != "failed") or (fill_result == "done" and state != "filling"):
        raise InvalidInput("fill_result done goes with state filling, failed with state failed")
    for number in (fill_bytes, fill_total):
        if number is not None and not 0 <= number <= 2**62:
            raise InvalidInput("fill_bytes and fill_total are byte counts")
    if reason is not None:
        reason = v.one_line(reason[:200])  # a machine's words: made one line, not refused
    if load is not None and (load < 0 or load > 1e6):
        raise InvalidInput("load is out of range")
    seen = now or utcnow()
    # Most heartbeats change nothing but when the machine was seen and its
    # load: decided from one row of facts and written with one UPDATE, without
    # loading the resource into the session (a third of a heartbeat's cost).
    facts = ctx.session.connection().execute(_HEARTBEAT_FACTS, {"rid": resource_id}).first()
    if facts is None or facts.token_hash is None or not token:
        raise AuthError("unknown resource or wrong token")
    if not hmac.compare_digest(facts.token_hash, hash_token(token)):
        raise AuthError("unknown resource or wrong token")
    stale = boot_generation < facts.boot_generation
    if stale or (
        facts.pending_command != "halt"
        and heartbeat_changes_nothing(
            state, facts.state, facts.ve_id is not None, facts.desired_state == VEDesiredState.RUNNING.value
        )
    ):
        ctx.session.connection().execute(_SEEN, {"rid": resource_id, "seen": seen, "load": load})
        ctx.commit()
        return HeartbeatAnswer(
            command="reboot" if stale else "none",
            heartbeat_interval=ctx.settings.heartbeat_interval,
            boot_generation=facts.boot_generation,
        )
    row = authenticate_resource(ctx, resource_id, token)
    row.last_seen = seen
    row.load = load
    ctx.session.add(row)
    command: Literal["none", "reboot", "halt"] = "none"
    if boot_generation < row.boot_generation:
        command = "reboot"
    elif row.pending_command == "halt":
        command = "halt"
        row.pending_command = None
        if row.state != S.OFF.value:
            transition(ctx, row, S.OFF, "halted on request")
    elif state == "filling" or fill_result is not None:
        from qrm_core.services.local_fill import fill_heartbeat

        command = fill_heartbeat(
            ctx,
            row,
            state,
            fill_bytes=fill_bytes,
            fill_total=fill_total,
            fill_device=fill_device,
            fill_result=fill_result,
            reason=reason,
        )
    elif state == "failed":
        if row.state != S.ERROR.value:
            transition(ctx, row, S.ERROR, f"its agent reports failure: {reason or 'no reason given'}")
    else:
        command = _apply_heartbeat(ctx, row, state)
    ctx.commit()
    return HeartbeatAnswer(
        command=command,
        heartbeat_interval=ctx.settings.heartbeat_interval,
        boot_generation=row.boot_generation,
    )


_RESOURCE = Resource.__table__  # type: ignore[attr-defined]
_VE = VirtualEnvironment.__table__  # type: ignore[attr-defined]
_HEARTBEAT_FACTS = (
    sa.select(
        _RESOURCE.c.token_hash,
        _RESOURCE.c.boot_generation,
        _RESOURCE.c.pending_command,
        _RESOURCE.c.state,
        _RESOURCE.c.ve_id,
        _VE.c.desired_state,
    )
    .select_from(_RESOURCE.outerjoin(_VE, _VE.c.id == _RESOURCE.c.ve_id))
    .where(_RESOURCE.c.id == sa.bindparam("rid"))
)
_SEEN = (
    sa.update(_RESOURCE)
    .where(_RESOURCE.c.id == sa.bindparam("rid"))
    .values(last_seen=sa.bindparam("seen"), load=sa.bindparam("load"))
)


def heartbeat_changes_nothing(state: str, resource_state: str, has_ve: bool, ve_running: bool) -> bool:
    """Whether :func:`_apply_heartbeat` would leave the resource as it is and answer ``none``.

    Must agree with ``_apply_heartbeat`` (a test checks every combination).
    """
    if state == "active":
        return (
            has_ve and ve_running and resource_state not in (S.ASSIGNED.value, S.BOOTING.value, S.ERROR.value)
        )
    if state == "idle":
        if has_ve:
            return resource_state not in (S.BOOTING.value, S.ACTIVE.value)
        return resource_state != S.ERROR.value
    return False


def _apply_heartbeat(ctx: ServiceContext, row: Resource, state: str) -> Literal["none", "reboot"]:
    ve = ctx.session.get(VirtualEnvironment, row.ve_id) if row.ve_id is not None else None
    if state == "active":
        if ve is None or ve.desired_state != VEDesiredState.RUNNING.value:
            if ve is not None:
                release(ctx, row, "its virtual environment is stopping", reboot=True)
            else:
                if row.state != S.IDLE.value and row.state != S.ERROR.value:
                    transition(ctx, row, S.IDLE, "runs a virtual environment it does not serve")
                _order_reboot(ctx, row, "runs a virtual environment it does not serve")
            return "reboot"
        if row.state == S.ASSIGNED.value:
            transition(ctx, row, S.BOOTING, f"booting virtual environment {ve.name}")
        if row.state in (S.BOOTING.value, S.ERROR.value):
            transition(ctx, row, S.ACTIVE, f"serving virtual environment {ve.name}")
        return "none"
    # state == "idle"
    if ve is not None and row.state in (S.BOOTING.value, S.ACTIVE.value):
        # Claims idle while qrm believes it serves a VE: reboot it into the VE.
        _order_reboot(ctx, row, f"must boot into virtual environment {ve.name}")
        return "reboot"
    if ve is None and row.state == S.ERROR.value:
        transition(ctx, row, S.IDLE, "heartbeats resumed")
    return "none"


def _refuse_managed(row: Resource, doing: str) -> None:
    """A host another manager owns (an ESXi host synced from vCenter) runs no qrm agent:
    a command for its next heartbeat would wait for ever."""
    if row.managed_by:
        raise Conflict(
            f"resource {public.resource_label(row)} is managed by {row.managed_by} and runs no qrm agent; "
            f"{doing} it through its manager"
        )


def order_halt(ctx: ServiceContext, ref: str | int) -> None:
    """Power a resource off at its next heartbeat (only when it serves no VE)."""
    from qrm_core.errors import InUse
    from qrm_core.services.resources import find_resource_row

    row = find_resource_row(ctx, ref)
    _refuse_managed(row, "halt")
    if row.ve_id is not None:
        raise InUse(f"resource {public.resource_label(row)} serves a virtual environment; stop it first")
    row.pending_command = "halt"
    ctx.session.add(row)
    ctx.record("resource", public.resource_label(row), "halt ordered")
    ctx.commit()


def order_reboot(ctx: ServiceContext, ref: str | int) -> None:
    """Reboot a resource at its next heartbeat (into whatever it should boot now)."""
    from qrm_core.services.resources import find_resource_row

    row = find_resource_row(ctx, ref)
    _refuse_managed(row, "reboot")
    if row.last_seen is None:
        raise NotFound(f"resource {public.resource_label(row)} has never been seen; nothing to reboot")
    _order_reboot(ctx, row, "on request")
    ctx.commit()
