"""Partitions (a step of a pass): VMs for partitioned VEs, made on demand.

A partitioned VE with no idle VM of its hypervisor gets a new partition on the
least loaded host of that hypervisor. Driver calls (each host's inventory,
creating and starting the VM) run with no database transaction open, in
phases: read what is needed and commit; ask the hosts; record the new
partition (state ``creating``) and commit, so it is durable before anything
is made; create and start it; record the outcome. A pass that finds a
``creating`` row (a killed server, a failed call) finishes the job, and the
driver's own ``list_partitions`` says what already exists, so repeating is
safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import col, select

from qrm_core.drivers.base import HostTarget, PartitionSpec
from qrm_core.engine.common import LIVE, S, TickReport, set_problem
from qrm_core.errors import QrmError
from qrm_core.models import (
    Deployment,
    Partition,
    PartitionState,
    Resource,
    VEDesiredState,
    VirtualEnvironment,
)
from qrm_core.services import ServiceContext, public
from qrm_core.services.partitions import (
    CreateJob,
    allocate_mac,
    free_partition_name,
    host_target,
    make_partition,
    record_made,
    room_problem,
    runs_hypervisor,
)


@dataclass
class Want:
    """A partitioned VE that needs a new partition, and the hosts that could take it."""

    ve_id: int
    ve_name: str
    hypervisor: str
    cpus: int
    memory_mb: int
    hosts: list[HostTarget] = field(default_factory=list)


class PartitionCreation:
    name = "partitions"

    def run(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        jobs = [self._job(ctx, p) for p in self._creating(ctx)]
        wants = self._wanted(ctx)
        ctx.commit()
        free = self._inventory(ctx, wants)  # driver calls, no transaction open
        for want in wants:
            job = self._record_new(ctx, want, free)
            if job is not None:
                jobs.append(job)
                report.partitions_created += 1
        ctx.commit()
        for job in jobs:
            self._realize(ctx, job)

    # -- phase 1: read -----------------------------------------------------

    def _creating(self, ctx: ServiceContext) -> list[Partition]:
        return list(
            ctx.session.exec(
                select(Partition)
                .where(Partition.state == PartitionState.CREATING.value)
                .order_by(col(Partition.id))
            ).all()
        )

    def _job(self, ctx: ServiceContext, partition: Partition) -> CreateJob:
        host = ctx.session.get(Resource, partition.host_id)
        assert host is not None and partition.id is not None
        target = host_target(host)
        return CreateJob(
            partition_id=partition.id,
            hypervisor=partition.hypervisor,
            host=target,
            spec=PartitionSpec(
                name=partition.name,
                cpus=partition.cpus,
                memory_mb=partition.memory_mb,
                mac=partition.mac,
                # As recorded when it was added: a request racing this pass (or one this
                # pass finishes) makes the same domain whichever of the two defines it.
                max_cpus=partition.max_cpus,
                max_memory_mb=partition.max_memory_mb,
                network=target.network,
            ),
        )

    def _wanted(self, ctx: ServiceContext) -> list[Want]:
        partitioned = ctx.session.exec(
            select(VirtualEnvironment)
            .where(
                VirtualEnvironment.desired_state == VEDesiredState.RUNNING.value,
                VirtualEnvironment.deployment == Deployment.PARTITIONED.value,
            )
            .order_by(col(VirtualEnvironment.id))
        ).all()
        if not partitioned:
            return []
        live_hosts = ctx.session.exec(
            select(Resource).where(col(Resource.state).in_(LIVE)).order_by(col(Resource.id))
        ).all()
        wants: list[Want] = []
        for ve in partitioned:
            members = ctx.session.exec(
                select(sa.func.count()).select_from(Resource).where(Resource.ve_id == ve.id)
            ).one()
            if members >= ve.pool_size:
                set_problem(ctx, ve, "")
                continue
            pending = ctx.session.exec(
                select(Partition).where(
                    Partition.ve_id == ve.id,
                    col(Partition.state).in_([PartitionState.CREATING.value, PartitionState.RUNNING.value]),
                )
            ).all()
            waiting = [p for p in pending if p.resource_id is None or self._not_yet_idle(ctx, p)]
            if waiting:
                p = waiting[0]
                host = ctx.session.get(Resource, p.host_id)
                set_problem(
                    ctx,
                    ve,
                    f"waiting for partition {p.name} on {public.resource_label(host) if host else '?'} to boot",
                )
                continue
            hypervisor = ve.req_hypervisor
            assert hypervisor is not None and ve.id is not None
            failed_hosts = set(
                ctx.session.exec(
                    select(Partition.host_id).where(
                        Partition.ve_id == ve.id, Partition.state == PartitionState.ERROR.value
                    )
                ).all()
            )
            hosts = [
                host_target(r)
                for r in live_hosts
                if runs_hypervisor(r, hypervisor) and r.id not in failed_hosts
            ]
            if not hosts:
                set_problem(ctx, ve, f"no live host runs hypervisor {hypervisor}")
                continue
            wants.append(
                Want(
                    ve_id=ve.id,
                    ve_name=ve.name,
                    hypervisor=hypervisor,
                    cpus=max(ve.req_cpus, 1),
                    memory_mb=max(ve.req_memory_mb, 1),
                    hosts=hosts,
                )
            )
        return wants

    def _not_yet_idle(self, ctx: ServiceContext, partition: Partition) -> bool:
        row = ctx.session.get(Resource, partition.resource_id)
        return row is not None and row.state in (S.NEW.value, S.OFF.value)

    # -- phase 2: ask the hosts (no transaction) -----------------------------

    def _inventory(self, ctx: ServiceContext, wants: list[Want]) -> dict[tuple[str, int], int | str]:
        """Free memory (MB) per (hypervisor, host), or why the host could not tell."""
        free: dict[tuple[str, int], int | str] = {}
        for want in wants:
            for host in want.hosts:
                key = (want.hypervisor, host.resource_id)
                if key in free:
                    continue
                try:
                    driver = ctx.plugins.hypervisor_driver(want.hypervisor)
                    driver.validate_host(host)
                    info = driver.host_info(host)
                except QrmError as exc:
                    free[key] = exc.message
                    continue
                free[key] = info.free_memory_mb if info.cpus >= want.cpus else -1
        return free

    # -- phase 3: record the new partition ----------------------------------

    def _record_new(
        self, ctx: ServiceContext, want: Want, free: dict[tuple[str, int], int | str]
    ) -> CreateJob | None:
        ve = ctx.session.get(VirtualEnvironment, want.ve_id, populate_existing=True)
        if ve is None or ve.desired_state != VEDesiredState.RUNNING.value:
            return None
        best: HostTarget | None = None
        best_free = -1
        notes: list[str] = []
        for host in want.hosts:
            room = free[(want.hypervisor, host.resource_id)]
            row = ctx.session.get(Resource, host.resource_id)
            problem = room_problem(ctx, row, want.cpus, want.memory_mb) if row is not None else None
            if problem is not None:  # qrm's own capacity rule (overcommit included), as for operators
                notes.append(problem.message)
            elif isinstance(room, str):
                notes.append(f"{host.label}: {room}")
            elif room >= want.memory_mb and room > best_free:
                best, best_free = host, room
            else:
                notes.append(f"{host.label} has {max(room, 0)} MB free")
        if best is None:
            set_problem(
                ctx,
                ve,
                f"no host of hypervisor {want.hypervisor} has room for {want.cpus} CPUs and "
                f"{want.memory_mb} MB ({'; '.join(notes)})",
            )
            return None
        free[(want.hypervisor, best.resource_id)] = best_free - want.memory_mb  # taken in this pass
        partition = Partition(
            name=free_partition_name(ctx, best.resource_id, want.ve_name),
            host_id=best.resource_id,
            hypervisor=want.hypervisor,
            cpus=want.cpus,
            memory_mb=want.memory_mb,
            mac=allocate_mac(ctx),
            state=PartitionState.CREATING.value,
            ve_id=want.ve_id,
        )
        try:
            ctx.plugins.hypervisor_driver(want.hypervisor).validate_partition(
                best,
                PartitionSpec(
                    name=partition.name, cpus=want.cpus, memory_mb=want.memory_mb, mac=partition.mac
                ),
            )
        except QrmError as exc:
            set_problem(ctx, ve, f"cannot create a partition on {best.label}: {exc.message}")
            return None
        ctx.session.add(partition)
        ctx.record(
            "partition", partition.name, f"creating partition {partition.name} for {ve.name} on {best.label}"
        )
        set_problem(ctx, ve, f"creating partition {partition.name} on {best.label}")
        ctx.flush()
        assert partition.id is not None
        return CreateJob(
            partition_id=partition.id,
            hypervisor=want.hypervisor,
            host=best,
            spec=PartitionSpec(
                name=partition.name,
                cpus=partition.cpus,
                memory_mb=partition.memory_mb,
                mac=partition.mac,
                network=best.network,
            ),
        )

    # -- phase 4 and 5: make it (no transaction), record the outcome ---------

    def _realize(self, ctx: ServiceContext, job: CreateJob) -> None:
        """Create and start a partition recorded as ``creating``; safe to repeat."""
        record_made(ctx, job, make_partition(ctx, job))
