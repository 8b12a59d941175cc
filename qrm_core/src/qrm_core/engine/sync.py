"""Partition sync (a step of a pass, every ``partition_sync_interval`` seconds).

Each hypervisor host with partitions is reconciled with what its hypervisor
lists (:func:`qrm_core.services.partitions.sync_host`): a partition paused,
stopped or destroyed behind qrm's back is recorded, as Ironic's power state
sync does for machines. Drivers that follow their hypervisor's events (the
libvirt and VMware plugins) report such changes at once; this pass catches
what no event reported (a driver without events, an event lost while the
server was down). ``sync_host`` calls the driver with no transaction open.
A host that cannot be reached is recorded once per distinct reason, not on
every pass.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import select

from qrm_core.engine.common import TickReport
from qrm_core.errors import QrmError
from qrm_core.models import EventLevel, Partition, PartitionState, Resource
from qrm_core.services import ServiceContext, public
from qrm_core.services.partitions import sync_host


class PartitionSync:
    name = "partition-sync"

    def __init__(self) -> None:
        self.last_run: datetime | None = None
        self.failures: dict[int, str] = {}  # host id -> the reason last recorded

    def due(self, now: datetime, interval: float) -> bool:
        return interval > 0 and (self.last_run is None or (now - self.last_run).total_seconds() >= interval)

    def run(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        if not self.due(now, ctx.settings.partition_sync_interval):
            return
        self.last_run = now
        host_ids = sorted(
            set(
                ctx.session.exec(
                    select(Partition.host_id).where(Partition.state != PartitionState.CREATING.value)
                ).all()
            )
        )
        ctx.commit()
        for host_id in host_ids:
            try:
                sync_host(ctx, host_id, now=now)
            except QrmError as exc:
                ctx.rollback()
                self._failed(ctx, host_id, exc.message)
                continue
            if self.failures.pop(host_id, None) is not None:
                host = ctx.session.get(Resource, host_id)
                label = public.resource_label(host) if host is not None else str(host_id)
                ctx.record("resource", label, f"partitions of {label} can be reconciled again")
                ctx.commit()

    def _failed(self, ctx: ServiceContext, host_id: int, message: str) -> None:
        if self.failures.get(host_id) == message:
            return
        self.failures[host_id] = message
        host = ctx.session.get(Resource, host_id)
        label = public.resource_label(host) if host is not None else str(host_id)
        ctx.record(
            "resource",
            label,
            f"cannot reconcile the partitions of {label} with its hypervisor: {message}",
            level=EventLevel.WARNING,
        )
        ctx.commit()
