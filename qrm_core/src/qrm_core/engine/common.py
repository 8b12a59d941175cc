"""What the reconciler's steps share: the pass report, state groups, small helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from qrm_core.models import ResourceState, VirtualEnvironment
from qrm_core.services import ServiceContext

S = ResourceState
#: States of a resource whose heartbeats are watched.
LIVE = (S.IDLE.value, S.ASSIGNED.value, S.BOOTING.value, S.ACTIVE.value)
#: States of a resource serving its VE (or on its way to).
BOUND_STATES = (S.ASSIGNED.value, S.BOOTING.value, S.ACTIVE.value)


@dataclass
class TickReport:
    failed: int = 0
    released: int = 0
    assigned: int = 0
    partitions_created: int = 0
    ve_changes: int = 0
    #: VEs asked to run that this pass could not give every resource they need:
    #: a machine that registers idle now may be theirs (the server then wakes the
    #: engine at once and asks that machine to heartbeat soon).
    waiting: int = 0
    durations: dict[str, float] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return sum(self.durations.values())

    @property
    def busy(self) -> bool:
        return bool(
            self.failed or self.released or self.assigned or self.partitions_created or self.ve_changes
        )


class Step(Protocol):
    """One step of a reconcile pass. It runs in a fresh service context and
    ends with everything committed; a step that calls drivers commits first and
    calls them with no transaction open (read, commit, call, record)."""

    name: str

    def run(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None: ...


def set_problem(ctx: ServiceContext, ve: VirtualEnvironment, problem: str) -> None:
    """Set the VE's one-line problem (empty: none) in the current transaction."""
    if ve.problem != problem:
        ve.problem = problem[:1024]
        ctx.session.add(ve)
