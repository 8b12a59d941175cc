"""VE states (last step of a pass): derived from the members.

starting / running / degraded / stopping / stopped follow from how many
members a VE has and in which state; the started/stopped hooks fire on
change. A paused member counts as a member that is not active: its VE is
degraded, not failed over.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import col, select

from qrm_core.engine.common import S, TickReport, set_problem
from qrm_core.engine.exports import Exports
from qrm_core.models import Resource, VEDesiredState, VEState, VirtualEnvironment
from qrm_core.services import ServiceContext, public
from qrm_core.services.images import RESET_FAILED


class StateDerivation:
    name = "states"

    def __init__(self, exports: Exports | None = None) -> None:
        self.exports = exports

    def run(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        counts: dict[int, Counter[str]] = defaultdict(Counter)
        for ve_id, state, n in ctx.session.exec(
            select(Resource.ve_id, Resource.state, sa.func.count())
            .where(col(Resource.ve_id).is_not(None))
            .group_by(Resource.ve_id, Resource.state)
        ):
            counts[ve_id][state] += n
        # A member whose filesystem image is not exported to it is not serving.
        unexported = self.exports.unexported() if self.exports is not None else {}
        started: list[VirtualEnvironment] = []
        stopped: list[VirtualEnvironment] = []
        for ve in ctx.session.exec(
            select(VirtualEnvironment).where(
                sa.or_(
                    VirtualEnvironment.desired_state == VEDesiredState.RUNNING.value,
                    VirtualEnvironment.state != VEState.STOPPED.value,
                )
            )
        ).all():
            members = counts.get(ve.id or 0, Counter())
            total = sum(members.values())
            active = members[S.ACTIVE.value]
            if ve.desired_state == VEDesiredState.STOPPED.value:
                new = VEState.STOPPING.value if total else VEState.STOPPED.value
            elif active >= ve.pool_size and ve.id not in unexported:
                new = VEState.RUNNING.value
            elif ve.state in (VEState.RUNNING.value, VEState.DEGRADED.value):
                new = VEState.DEGRADED.value
            else:
                new = VEState.STARTING.value
            if (
                ve.desired_state == VEDesiredState.RUNNING.value
                and members[S.ERROR.value]
                and not ve.failover
            ):
                failing = ctx.session.exec(
                    select(Resource).where(Resource.ve_id == ve.id, Resource.state == S.ERROR.value)
                ).all()
                set_problem(
                    ctx,
                    ve,
                    "resource(s) "
                    + ", ".join(public.resource_label(r) for r in failing)
                    + " stopped responding (failover is off)",
                )
            if ve.desired_state == VEDesiredState.RUNNING.value and unexported.get(ve.id or 0):
                set_problem(ctx, ve, unexported[ve.id or 0])
            elif new == VEState.STOPPED.value and ve.problem and not ve.problem.startswith(RESET_FAILED):
                set_problem(
                    ctx, ve, ""
                )  # a stopped VE has no problem left to show (but why its reset failed)
            if new != ve.state:
                old = ve.state
                ve.state = new
                ve.updated_at = now
                ctx.session.add(ve)
                ctx.record("ve", ve.name, f"virtual environment {ve.name} {old} -> {new}")
                report.ve_changes += 1
                if new == VEState.RUNNING.value:
                    started.append(ve)
                elif new == VEState.STOPPED.value:
                    stopped.append(ve)
        ctx.commit()
        for ve in started:
            ctx.hooks.ve_started(public.one_ve(ctx.session, ve), ctx.hook_ctx)
        for ve in stopped:
            ctx.hooks.ve_stopped(public.one_ve(ctx.session, ve), ctx.hook_ctx)
