"""Partitions: VMs the engine created on hypervisor hosts."""

from __future__ import annotations

from sqlmodel import col, select

from qrm_core.drivers.base import HostTarget
from qrm_core.errors import InUse, InvalidInput, NotFound
from qrm_core.models import Partition, PartitionPublic, Resource
from qrm_core.services import ServiceContext, public


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
    )


def list_partitions(ctx: ServiceContext) -> list[PartitionPublic]:
    rows = ctx.session.exec(select(Partition).order_by(col(Partition.id))).all()
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


def remove_partition(ctx: ServiceContext, name: str, host: str | None = None) -> PartitionPublic:
    """Destroy a partition on its hypervisor and forget it and the virtual resource it became."""
    row = find_partition_row(ctx, name, host)
    resource = ctx.session.get(Resource, row.resource_id) if row.resource_id is not None else None
    if resource is not None and resource.ve_id is not None:
        raise InUse(
            f"partition {name} is resource {public.resource_label(resource)}, which serves a virtual "
            "environment; stop it first"
        )
    host_row = ctx.session.get(Resource, row.host_id)
    assert host_row is not None
    driver = ctx.plugins.hypervisor_driver(row.hypervisor)
    try:
        driver.destroy_partition(host_target(host_row), row.name)
    except NotFound:
        pass  # already gone on the hypervisor: forget it here too
    result = public.partitions(ctx.session, [row])[0]
    resource_result = public.one_resource(ctx.session, resource) if resource is not None else None
    ctx.session.delete(row)
    if resource is not None:
        ctx.session.flush()
        ctx.session.delete(resource)
        ctx.record("resource", public.resource_label(resource), f"virtual resource {resource.mac} removed")
    ctx.record("partition", name, f"partition {name} destroyed on {public.resource_label(host_row)}")
    ctx.commit()
    ctx.hooks.partition_removed(result, ctx.hook_ctx)
    if resource_result is not None:
        ctx.hooks.resource_removed(resource_result, ctx.hook_ctx)
    return result
