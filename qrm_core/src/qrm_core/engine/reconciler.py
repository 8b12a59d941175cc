"""The reconciler: drives every VE's actual state towards its desired state.

One pass (:meth:`Reconciler.tick`) runs these steps, each in its own service
context, each idempotent, so a server killed at any point continues
correctly after restart (the database is the only memory):

1. **Failure detection** and 2. **failover and fencing**
   (:mod:`qrm_core.engine.failures`).
3. **Auto images**: an ``--auto`` filesystem image a VE wants is filled in a
   thread of its own (:mod:`qrm_core.engine.images`).
   **Placement** of idle resources into VEs short of them, never into a VE
   whose filesystem image is not ready (:mod:`qrm_core.engine.placement`).
4. **Exports**: the new members get access to their VE's filesystem image
   (:mod:`qrm_core.engine.exports`).
5. **Partitions** for partitioned VEs, made on demand
   (:mod:`qrm_core.engine.partitions`).
6. **VE states**, derived from the members (:mod:`qrm_core.engine.states`).
7. **Partition sync**, every ``partition_sync_interval`` seconds: each
   hypervisor host's partitions reconciled with what its hypervisor lists
   (:mod:`qrm_core.engine.sync`).

No step calls a driver inside a database transaction: each reads what it
needs, commits, calls the drivers, and records the outcomes in a new
transaction (on SQLite an open transaction holds the write lock, and would
stop every registration and heartbeat while a driver works).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from qrm_core.engine.common import TickReport
from qrm_core.engine.exports import Exports
from qrm_core.engine.failures import Failover, FailureDetection
from qrm_core.engine.images import AutoImages
from qrm_core.engine.partitions import PartitionCreation
from qrm_core.engine.placement import Placement
from qrm_core.engine.states import StateDerivation
from qrm_core.engine.sync import PartitionSync
from qrm_core.models import utcnow
from qrm_core.services import service_context

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.engine.common import Step
    from qrm_core.plugins import PluginSystem

__all__ = ["Reconciler", "TickReport"]


class Reconciler:
    """Runs reconcile passes against the configured database."""

    def __init__(
        self,
        settings: Settings,
        plugins: PluginSystem,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.clock = clock
        self.exports = Exports()
        self.auto_images = AutoImages()
        self.steps: list[Step] = [
            FailureDetection(),
            Failover(),
            self.auto_images,
            Placement(self.exports),
            self.exports,
            PartitionCreation(),
            StateDerivation(self.exports),
            PartitionSync(),
        ]

    def became_leader(self) -> None:
        """Re-check every member's export on the next pass (a previous leader may
        have died between an assignment and its export)."""
        self.exports.verified = False

    def tick(self) -> TickReport:
        report = TickReport()
        now = self.clock()
        for step in self.steps:
            started = time.perf_counter()
            with service_context(self.settings, actor="engine", plugins=self.plugins) as ctx:
                step.run(ctx, now, report)
            report.durations[step.name] = time.perf_counter() - started
        return report
