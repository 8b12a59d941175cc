"""Failure detection, failover and fencing (steps 1 and 2 of a pass).

A live resource whose heartbeats stopped for longer than its timeout goes to
``error``: the heartbeat timeout, or the boot timeout for a machine rebooting at
qrm's order or booting its VE (between its registration from the initrd and the
one from the VE's root it mounts the root, silently). A failed member of a VE with failover on (or of a stopping VE) is
then fenced and released: a partition is powered off through its hypervisor
driver, a physical machine with a power controller through its power driver;
its boot generation is raised, so it can never serve the VE again unless
assigned anew. Fencing calls drivers, so it runs with no database transaction
open: read what to fence, commit, fence, then record and release in a new
transaction, re-checking that each resource is still failed and still in its
VE. A paused partition is silent on purpose and is never taken for failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import col, select

from qrm_core.drivers.base import HostTarget, PowerTarget
from qrm_core.engine.common import LIVE, S, TickReport
from qrm_core.errors import QrmError
from qrm_core.models import (
    EventLevel,
    Partition,
    PartitionState,
    Resource,
    VEDesiredState,
    VirtualEnvironment,
)
from qrm_core.services import ServiceContext, public
from qrm_core.services.agent import release
from qrm_core.services.partitions import host_target
from qrm_core.services.power import power_target
from qrm_core.services.resources import transition


class FailureDetection:
    name = "failures"

    def run(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        default = ctx.settings.heartbeat_timeout
        booting = ctx.settings.boot_timeout
        shortest = ctx.session.exec(select(sa.func.min(Resource.heartbeat_timeout))).one()
        cutoff = now - timedelta(seconds=min(default, booting, shortest or default))
        rows = ctx.session.exec(
            select(Resource)
            .where(col(Resource.state).in_(LIVE), col(Resource.last_seen) < cutoff)
            .order_by(col(Resource.id))
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            rebooting = row.booted_generation < row.boot_generation
            # Registered from its initrd, it mounts its root (an iSCSI login, an NFS mount, an
            # archive fetched) and registers again from it: silent meanwhile, as in a reboot.
            mounting = not rebooting and row.state == S.BOOTING.value
            timeout = booting if rebooting or mounting else (row.heartbeat_timeout or default)
            assert row.last_seen is not None
            silent = (now - row.last_seen).total_seconds()
            if silent > timeout:
                what = (
                    "did not come back from the reboot"
                    if rebooting
                    else "did not finish booting its virtual environment"
                    if mounting
                    else "no heartbeat"
                )
                transition(ctx, row, S.ERROR, f"{what} for {silent:.0f} s (timeout {timeout:.0f} s)")
                report.failed += 1
        ctx.commit()


@dataclass(frozen=True)
class FencePlan:
    """How to fence one failed resource, read from the database beforehand."""

    resource_id: int
    ve_id: int
    label: str
    why: str
    # A partition: powered off through its hypervisor.
    partition_id: int | None = None
    partition_name: str | None = None
    hypervisor: str | None = None
    host: HostTarget | None = None
    # A machine with a power controller: powered off through its power driver.
    power_driver: str | None = None
    power: PowerTarget | None = None


@dataclass(frozen=True)
class FenceOutcome:
    fenced: bool
    message: str


class Failover:
    name = "failover"

    def run(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        failed = ctx.session.exec(
            select(Resource)
            .where(Resource.state == S.ERROR.value, col(Resource.ve_id).is_not(None))
            .order_by(col(Resource.id))
        ).all()
        if not failed:
            ctx.commit()
            return
        ves = {
            ve.id: ve
            for ve in ctx.session.exec(
                select(VirtualEnvironment).where(col(VirtualEnvironment.id).in_({r.ve_id for r in failed}))
            )
        }
        plans: list[FencePlan] = []
        for row in failed:
            ve = ves[row.ve_id]
            if ve.failover or ve.desired_state == VEDesiredState.STOPPED.value:
                why = "failed; failover" if ve.failover else "failed while its VE stopped"
                plans.append(self._plan(ctx, row, why))
        ctx.commit()  # no transaction stays open while drivers fence
        outcomes = [(plan, self._fence(ctx, plan)) for plan in plans]
        for plan, outcome in outcomes:
            current = ctx.session.get(
                Resource, plan.resource_id, populate_existing=True, with_for_update=True
            )
            self._record(ctx, plan, outcome)
            if current is None or current.state != S.ERROR.value or current.ve_id != plan.ve_id:
                continue  # its heartbeats came back, or an operator acted: not released here
            release(ctx, current, plan.why, reboot=True)
            report.released += 1
        ctx.commit()

    def _plan(self, ctx: ServiceContext, row: Resource, why: str) -> FencePlan:
        assert row.id is not None and row.ve_id is not None
        label = public.resource_label(row)
        partition = ctx.session.exec(select(Partition).where(Partition.resource_id == row.id)).first()
        if partition is not None:
            host = ctx.session.get(Resource, partition.host_id)
            assert host is not None
            return FencePlan(
                resource_id=row.id,
                ve_id=row.ve_id,
                label=label,
                why=why,
                partition_id=partition.id,
                partition_name=partition.name,
                hypervisor=partition.hypervisor,
                host=host_target(host),
            )
        return FencePlan(
            resource_id=row.id,
            ve_id=row.ve_id,
            label=label,
            why=why,
            power_driver=row.power_driver,
            power=power_target(row),
        )

    def _fence(self, ctx: ServiceContext, plan: FencePlan) -> FenceOutcome | None:
        """Power the failed machine off; None when it has nothing to fence it with."""
        try:
            if plan.partition_name is not None:
                assert plan.hypervisor is not None and plan.host is not None
                driver = ctx.plugins.hypervisor_driver(plan.hypervisor)
                driver.validate_host(plan.host)
                driver.stop_partition(plan.host, plan.partition_name, force=True)
                return FenceOutcome(
                    True, f"partition {plan.partition_name} fenced (powered off on {plan.host.label})"
                )
            if plan.power is not None and plan.power_driver:
                power = ctx.plugins.power_driver(plan.power_driver)
                power.validate(plan.power)
                power.power_off(plan.power, force=True)
                return FenceOutcome(
                    True, f"resource {plan.label} fenced (powered off through {plan.power_driver})"
                )
        except QrmError as exc:
            what = f"partition {plan.partition_name}" if plan.partition_name else f"resource {plan.label}"
            return FenceOutcome(False, f"could not fence {what}: {exc.message}")
        return None

    def _record(self, ctx: ServiceContext, plan: FencePlan, outcome: FenceOutcome | None) -> None:
        if outcome is None:
            ctx.record(
                "resource",
                plan.label,
                f"resource {plan.label} not fenced: it has no power controller "
                "(its raised boot generation keeps it out of the virtual environment)",
                level=EventLevel.WARNING,
            )
            return
        level = EventLevel.INFO if outcome.fenced else EventLevel.ERROR
        if plan.partition_id is None:
            ctx.record("resource", plan.label, outcome.message, level=level)
            return
        partition = ctx.session.get(Partition, plan.partition_id, populate_existing=True)
        if partition is None:
            return
        ctx.record("partition", partition.name, outcome.message, level=level)
        if not outcome.fenced or partition.state == PartitionState.STOPPED.value:
            return
        old = partition.state
        partition.state = PartitionState.STOPPED.value
        ctx.session.add(partition)
        if ctx.hooks.wants("qrm_partition_state_changed"):
            ctx.after_commit(
                lambda: ctx.hooks.partition_state_changed(
                    public.partitions(ctx.session, [partition])[0], old, ctx.hook_ctx
                )
            )
