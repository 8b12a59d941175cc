"""Virtual environments: a boot image plus a filesystem image plus requirements."""

from __future__ import annotations

from sqlmodel import col, select

from qrm_core.errors import AlreadyExists, Conflict, InUse, InvalidInput, NotFound, QrmError
from qrm_core.models import (
    Deployment,
    FilesystemImage,
    MemberHealthPublic,
    Partition,
    Resource,
    ResourceKind,
    StorageServer,
    VEDesiredState,
    VEState,
    VirtualEnvironment,
    VirtualEnvironmentDetail,
    VirtualEnvironmentPublic,
)
from qrm_core.services import ServiceContext, public
from qrm_core.services import validation as v
from qrm_core.services.boot_images import get_boot_image_row
from qrm_core.services.storage import export_readiness, get_fs_image_row

DEFAULT_SHARED_POOL = 2
DEFAULT_PARTITION_CPUS = 1
DEFAULT_PARTITION_MEMORY_MB = 256


def get_ve_row(ctx: ServiceContext, name: str) -> VirtualEnvironment:
    row = ctx.session.exec(select(VirtualEnvironment).where(VirtualEnvironment.name == name)).first()
    if row is None:
        raise NotFound(f"virtual environment {name!r} does not exist")
    return row


def create_ve(
    ctx: ServiceContext,
    *,
    name: str,
    boot_image: str,
    fs_image: str,
    deployment: str = Deployment.SINGLE.value,
    pool_size: int | None = None,
    hypervisor: str | None = None,
    kind: str | None = None,
    cpus: int | None = None,
    memory_mb: int | None = None,
    failover: bool = False,
    kernel_args: str | None = None,
    comment: str | None = None,
    monitor: list[str] | None = None,
    monitor_failover: bool = False,
    pristine: bool = False,
) -> VirtualEnvironmentPublic:
    """Define a virtual environment (it starts stopped). ``pristine``: keep a
    snapshot of its filesystem image as it is at the first start, for
    ``qrm ve reset`` (the image's storage must snapshot and revert)."""
    name = v.name(name, "virtual environment name")
    checks = v.monitor_checks(monitor)
    _check_monitor_failover(monitor_failover, failover, name)
    deployment = (deployment or "").strip().lower()
    if deployment not in Deployment.values():
        raise InvalidInput(f"unknown deployment {deployment!r}; use one of {', '.join(Deployment.values())}")
    if kind is not None:
        kind = kind.strip().lower()
        if kind not in ResourceKind.values():
            raise InvalidInput(f"unknown resource kind {kind!r}; use physical or virtual")
    if deployment == Deployment.SHARED.value:
        pool = DEFAULT_SHARED_POOL if pool_size is None else v.positive(pool_size, "pool size", 1, 10000)
    else:
        if pool_size not in (None, 1):
            raise InvalidInput("--pool-size applies to shared deployments only")
        pool = 1
    if hypervisor is not None:
        hypervisor = hypervisor.strip().lower()
        ctx.plugins.hypervisor_driver(hypervisor)  # DriverNotFound lists the installed ones
        if kind == ResourceKind.PHYSICAL.value:
            raise InvalidInput("a hypervisor requirement needs virtual resources, not physical ones")
        kind = ResourceKind.VIRTUAL.value
    if deployment == Deployment.PARTITIONED.value:
        if hypervisor is None:
            raise InvalidInput("a partitioned virtual environment needs --hypervisor")
        cpus = DEFAULT_PARTITION_CPUS if cpus is None else cpus
        memory_mb = DEFAULT_PARTITION_MEMORY_MB if memory_mb is None else memory_mb
        v.positive(cpus, "CPUs", 1, 1024)
        v.positive(memory_mb, "memory (MB)", 16, 16 * 1024 * 1024)
    else:
        cpus = 0 if cpus is None else v.positive(cpus, "CPUs", 0, 1024)
        memory_mb = 0 if memory_mb is None else v.positive(memory_mb, "memory (MB)", 0, 16 * 1024 * 1024)
    args = v.kernel_args(kernel_args)
    comment = v.comment(comment)
    boot_row = get_boot_image_row(ctx, boot_image)
    fs_row = get_fs_image_row(ctx, fs_image)
    storage_row = ctx.session.get(StorageServer, fs_row.storage_id)
    assert storage_row is not None and boot_row.id is not None and fs_row.id is not None
    # The image must be bootable from here: its storage driver must be present.
    ctx.plugins.storage_driver(storage_row.type)
    if pristine:
        from qrm_core.services.images import check_pristine_possible

        check_pristine_possible(ctx, fs_row)
    taken = ctx.session.exec(
        select(VirtualEnvironment.name).where(v.same_name(VirtualEnvironment.name, name))
    ).first()
    if taken:
        raise AlreadyExists(f"virtual environment {taken!r} already exists")
    row = VirtualEnvironment(
        name=name,
        boot_image_id=boot_row.id,
        fs_image_id=fs_row.id,
        deployment=deployment,
        req_kind=kind,
        req_hypervisor=hypervisor,
        req_cpus=cpus,
        req_memory_mb=memory_mb,
        pool_size=pool,
        failover=failover,
        monitor=checks,
        monitor_failover=monitor_failover,
        pristine=pristine,
        kernel_args=" ".join(args),
        comment=comment,
    )
    ctx.session.add(row)
    ctx.record(
        "ve",
        name,
        f"virtual environment {name} created ({deployment}, boot {boot_row.name}, "
        f"filesystem {fs_row.name}"
        + (f", pool {pool}" if deployment == Deployment.SHARED.value else "")
        + (f", {hypervisor}" if hypervisor else "")
        + (", failover" if failover else "")
        + (f", monitor {' '.join(checks)}" if checks else "")
        + (", failover on monitoring" if monitor_failover else "")
        + (", kept pristine" if pristine else "")
        + ")",
    )
    ctx.commit()
    result = public.one_ve(ctx.session, row)
    ctx.hooks.ve_created(result, ctx.hook_ctx)
    return result


def _check_monitor_failover(monitor_failover: bool, failover: bool, name: str) -> None:
    if monitor_failover and not failover:
        raise InvalidInput(
            f"failover on monitoring needs failover: virtual environment {name} has none "
            "(create it with --failover)"
        )


def set_ve(
    ctx: ServiceContext,
    name: str,
    *,
    monitor: list[str] | None = None,
    monitor_failover: bool | None = None,
) -> VirtualEnvironmentPublic:
    """Change what a virtual environment asks of monitoring (any time, running or not).

    ``monitor`` replaces the list of checks (``[]`` clears it); None leaves a
    setting as it is. Plugins hear of it through ``qrm_ve_updated``.
    """
    from qrm_core.models import utcnow

    checks = v.monitor_checks(monitor) if monitor is not None else None
    row = _locked_ve(ctx, name)
    if monitor_failover is not None and monitor_failover != row.monitor_failover:
        _check_monitor_failover(monitor_failover, row.failover, name)
    changed: list[str] = []
    notes: list[str] = []
    if checks is not None and checks != list(row.monitor or []):
        row.monitor = checks
        changed.append("monitor")
        notes.append(f"monitor checks {' '.join(checks) if checks else 'none'}")
    if monitor_failover is not None and monitor_failover != row.monitor_failover:
        row.monitor_failover = monitor_failover
        changed.append("monitor_failover")
        notes.append("failover on monitoring " + ("on" if monitor_failover else "off"))
    if not changed:
        ctx.rollback()
        return public.one_ve(ctx.session, row)
    row.updated_at = utcnow()
    ctx.session.add(row)
    ctx.record("ve", name, f"virtual environment {name}: {', '.join(notes)}")
    ctx.commit()
    result = public.one_ve(ctx.session, row)
    ctx.hooks.ve_updated(result, changed, ctx.hook_ctx)
    return result


def list_ves(ctx: ServiceContext, *, state: str | None = None) -> list[VirtualEnvironmentPublic]:
    query = select(VirtualEnvironment).order_by(VirtualEnvironment.name)
    if state is not None:
        if state not in VEState.values():
            raise InvalidInput(f"unknown state {state!r}; use one of {', '.join(VEState.values())}")
        query = query.where(VirtualEnvironment.state == state)
    return public.virtual_environments(ctx.session, ctx.session.exec(query).all())


def show_ve(ctx: ServiceContext, name: str) -> VirtualEnvironmentPublic:
    return public.one_ve(ctx.session, get_ve_row(ctx, name))


def ve_detail(ctx: ServiceContext, name: str) -> VirtualEnvironmentDetail:
    """One VE with what monitoring plugins say about each member (``ve show``)."""
    row = get_ve_row(ctx, name)
    result = public.one_ve(ctx.session, row)
    health: list[MemberHealthPublic] = []
    if ctx.hooks.wants("qrm_collect_health"):
        members = ctx.session.exec(
            select(Resource).where(Resource.ve_id == row.id).order_by(col(Resource.id))
        ).all()
        for member in public.resources(ctx.session, members):
            label = member.hostname or member.mac
            health.extend(
                MemberHealthPublic(resource=label, source=h.source, status=h.status, message=h.message)
                for h in ctx.hooks.collect_health(member, ctx.hook_ctx)
            )
    return VirtualEnvironmentDetail(**result.model_dump(), health=health)


def remove_ve(ctx: ServiceContext, name: str) -> VirtualEnvironmentPublic:
    row = get_ve_row(ctx, name)
    members = ctx.session.exec(select(Resource).where(Resource.ve_id == row.id)).all()
    if row.desired_state != VEDesiredState.STOPPED.value or row.state != VEState.STOPPED.value or members:
        serving = ", ".join(public.resource_label(r) for r in members)
        raise InUse(
            f"virtual environment {name!r} is {row.state}"
            + (f" on {serving}" if serving else "")
            + f"; stop it first with 'qrm ve stop {name}'"
        )
    result = public.one_ve(ctx.session, row)
    for partition in ctx.session.exec(select(Partition).where(Partition.ve_id == row.id)):
        partition.ve_id = None
        ctx.session.add(partition)
    ctx.session.delete(row)
    ctx.record("ve", name, f"virtual environment {name} removed")
    ctx.commit()
    ctx.hooks.ve_removed(result, ctx.hook_ctx)
    return result


# ---------------------------------------------------------------------------
# Start, stop, resize: requests the engine carries out
# ---------------------------------------------------------------------------


def _locked_ve(ctx: ServiceContext, name: str) -> VirtualEnvironment:
    row = ctx.session.exec(
        select(VirtualEnvironment).where(VirtualEnvironment.name == name).with_for_update()
    ).first()
    if row is None:
        raise NotFound(f"virtual environment {name!r} does not exist")
    return row


def start_ve(ctx: ServiceContext, name: str) -> VirtualEnvironmentPublic:
    """Ask for the VE to run. Idempotent; the engine places it on idle resources.
    A pristine VE's image is snapshotted first, once (no transaction is open meanwhile)."""
    from qrm_core.models import utcnow
    from qrm_core.services.images import keep_pristine

    keep_pristine(ctx, name)
    image = ctx.session.get(FilesystemImage, get_ve_row(ctx, name).fs_image_id)
    assert image is not None  # an image in use cannot be removed
    storage_id = image.storage_id
    storage_name, unready = export_readiness(ctx, storage_id)
    if unready:
        raise Conflict(
            f"virtual environment {name} cannot start: its filesystem image is on {storage_name}, "
            f"which cannot export: {unready}"
        )
    row = _locked_ve(ctx, name)
    if row.desired_state == VEDesiredState.RUNNING.value:
        ctx.rollback()
        return public.one_ve(ctx.session, row)
    _refuse_shared_read_write(ctx, row)
    row.desired_state = VEDesiredState.RUNNING.value
    row.generation += 1
    row.updated_at = utcnow()
    if row.state in (VEState.STOPPED.value, VEState.STOPPING.value):
        row.state = VEState.STARTING.value
    row.problem = ""
    ctx.session.add(row)
    ctx.record("ve", name, f"virtual environment {name} start requested")
    ctx.commit()
    result = public.one_ve(ctx.session, row)
    ctx.hooks.ve_starting(result, ctx.hook_ctx)
    return result


def _copies_per_machine(ctx: ServiceContext, image: FilesystemImage) -> bool:
    """Whether the image's storage type gives each machine a copy of its own
    (False when its plugin is missing: the start fails on that later)."""
    storage = ctx.session.get(StorageServer, image.storage_id)
    if storage is None:
        return False
    try:
        return ctx.plugins.storage_driver(storage.type).copies_per_machine
    except QrmError:
        return False


def _refuse_shared_read_write(ctx: ServiceContext, row: VirtualEnvironment) -> None:
    """No two VEs on one image where one of them mounts it read-write (every
    deployment but ``shared``, whose machines mount it read-only under an overlay):
    the writer's changes would corrupt what the other machines read. The image's
    row is locked, so two starts at once cannot both pass."""
    image = ctx.session.exec(
        select(FilesystemImage).where(FilesystemImage.id == row.fs_image_id).with_for_update()
    ).one()
    if _copies_per_machine(ctx, image):
        return  # each machine unpacks its own copy (a RAM root): nothing is shared
    others = ctx.session.exec(
        select(VirtualEnvironment)
        .where(
            VirtualEnvironment.fs_image_id == image.id,
            VirtualEnvironment.id != row.id,
            (VirtualEnvironment.desired_state != VEDesiredState.STOPPED.value)
            | (VirtualEnvironment.state != VEState.STOPPED.value),
        )
        .order_by(col(VirtualEnvironment.name))
    ).all()
    shared = Deployment.SHARED.value
    writer = next((o for o in others if o.deployment != shared), None)
    if writer is not None:
        raise InUse(
            f"virtual environment {row.name} cannot start: filesystem image {image.name} is exported "
            f"read-write to virtual environment {writer.name}, which is {writer.state} (stop {writer.name} first)"
        )
    if others and row.deployment != shared:
        reader = others[0]
        raise InUse(
            f"virtual environment {row.name} cannot start: it would mount filesystem image {image.name} "
            f"read-write while virtual environment {reader.name} ({reader.state}) shares it read-only "
            f"(stop {reader.name} first)"
        )


def stop_ve(ctx: ServiceContext, name: str) -> VirtualEnvironmentPublic:
    """Ask for the VE to stop: its resources reboot into the idle image and are released."""
    from qrm_core.models import utcnow
    from qrm_core.services.agent import release

    row = _locked_ve(ctx, name)
    if row.desired_state == VEDesiredState.STOPPED.value:
        ctx.rollback()
        return public.one_ve(ctx.session, row)
    row.desired_state = VEDesiredState.STOPPED.value
    row.generation += 1
    row.updated_at = utcnow()
    row.problem = ""
    row.reset_phase = ""  # a reset waiting for its machines stops waiting (services.images.reset_ve)
    members = ctx.session.exec(
        select(Resource).where(Resource.ve_id == row.id).order_by(col(Resource.id)).with_for_update()
    ).all()
    for member in members:
        if member.state in ("assigned", "booting", "active"):
            # Reboot into the idle image; released when it registers idle.
            member.boot_generation += 1
            ctx.session.add(member)
            ctx.record("resource", public.resource_label(member), f"reboot ordered: {name} is stopping")
        else:
            release(ctx, member, f"{name} stopped", reboot=True)
    remaining = [m for m in members if m.ve_id is not None]
    row.state = VEState.STOPPING.value if remaining else VEState.STOPPED.value
    ctx.session.add(row)
    ctx.record("ve", name, f"virtual environment {name} stop requested")
    ctx.commit()
    result = public.one_ve(ctx.session, row)
    ctx.hooks.ve_stopping(result, ctx.hook_ctx)
    if row.state == VEState.STOPPED.value:
        ctx.hooks.ve_stopped(result, ctx.hook_ctx)
    return result


def resize_ve(ctx: ServiceContext, name: str, pool_size: int) -> VirtualEnvironmentPublic:
    """Change a shared VE's pool size; shrinking releases the newest, least advanced members."""
    from qrm_core.models import utcnow
    from qrm_core.services.agent import release

    v.positive(pool_size, "pool size", 1, 10000)
    row = _locked_ve(ctx, name)
    if row.deployment != Deployment.SHARED.value:
        raise InvalidInput("only a shared virtual environment has a pool size")
    if row.pool_size == pool_size:
        ctx.rollback()
        return public.one_ve(ctx.session, row)
    old = row.pool_size
    row.pool_size = pool_size
    row.updated_at = utcnow()
    ctx.session.add(row)
    members = ctx.session.exec(select(Resource).where(Resource.ve_id == row.id).with_for_update()).all()
    excess = len(members) - pool_size
    if excess > 0:
        rank = {"error": 0, "assigned": 1, "booting": 2, "active": 3}
        for member in sorted(members, key=lambda m: (rank.get(m.state, 0), -(m.id or 0)))[:excess]:
            release(ctx, member, f"pool of {name} shrunk to {pool_size}", reboot=True)
    ctx.record("ve", name, f"pool of virtual environment {name} resized from {old} to {pool_size}")
    ctx.commit()
    return public.one_ve(ctx.session, row)
