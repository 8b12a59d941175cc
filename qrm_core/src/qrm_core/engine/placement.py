"""Placement (step 3 of a pass): idle resources for the VEs that are short of them.

Every VE that should run and is short of resources gets idle resources meeting
its requirements (one query, then in-memory matching in
:mod:`qrm_core.engine.scheduler`); each assignment is a guarded update
(``WHERE state = 'idle' AND ve_id IS NULL``), so two engines, or an engine and
an operator, can never put one resource into two VEs. A VE that cannot be
placed gets a one-line ``problem`` saying why. No driver is called here: the
exports step gives the new members access to their VE's filesystem image.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Protocol

import sqlalchemy as sa
from sqlmodel import col, select

from qrm_core.engine.common import S, TickReport
from qrm_core.engine.exports import EXPORT_PROBLEM
from qrm_core.engine.scheduler import Candidate, CandidatePool, Requirements
from qrm_core.models import (
    Deployment,
    FilesystemImage,
    ImageState,
    Partition,
    Resource,
    VEDesiredState,
    VirtualEnvironment,
)
from qrm_core.services import ServiceContext, local_fill, public

_ASSIGN_CHUNK = 500  # resources per UPDATE ... RETURNING when placing


class ExportQueue(Protocol):
    def expect(self, resource_id: int, ve_id: int) -> None: ...


class Placement:
    name = "placement"

    def __init__(self, exports: ExportQueue) -> None:
        self.exports = exports

    def run(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        wanting = ctx.session.exec(
            select(VirtualEnvironment)
            .where(VirtualEnvironment.desired_state == VEDesiredState.RUNNING.value)
            .order_by(col(VirtualEnvironment.id))
            .with_for_update()
        ).all()
        if not wanting:
            return
        # Members per VE, and per VE and host (for spreading shared pools).
        bound: Counter[int] = Counter()
        failed_kept: set[int] = set()
        per_host: dict[int, Counter[int]] = defaultdict(Counter)
        failover_of = {ve.id: ve.failover for ve in wanting}
        for ve_id, rid, host_id, state in ctx.session.exec(
            select(Resource.ve_id, Resource.id, Resource.host_id, Resource.state).where(
                col(Resource.ve_id).in_(list(failover_of))
            )
        ):
            if state == S.ERROR.value:
                if failover_of.get(ve_id):
                    continue  # about to be replaced
                failed_kept.add(ve_id)
            bound[ve_id] += 1
            per_host[ve_id][host_id if host_id is not None else rid] += 1
        problems, caps = self._images_not_ready(ctx, wanting)
        short = [ve for ve in wanting if bound[ve.id] < ve.pool_size and ve.id not in problems]
        if short:
            pool = CandidatePool(self._candidates(ctx))
            made_for = self._partitions_made_for(
                ctx, [ve.id for ve in short if ve.deployment == "partitioned"]
            )
            assignments: list[tuple[VirtualEnvironment, Candidate]] = []
            for ve in short:
                need = min(ve.pool_size, caps.get(ve.id, ve.pool_size)) - bound[ve.id]
                if need <= 0:
                    continue
                req = Requirements(
                    kind=ve.req_kind,
                    hypervisor=ve.req_hypervisor,
                    cpus=ve.req_cpus,
                    memory_mb=ve.req_memory_mb,
                    prefer=made_for.get(ve.id, frozenset()),
                )
                spread = per_host[ve.id] if ve.deployment == Deployment.SHARED.value else None
                chosen = pool.take(req, need, spread)
                assignments.extend((ve, c) for c in chosen)
                if len(chosen) < need:
                    report.waiting += 1
                if len(chosen) < need and ve.deployment != Deployment.PARTITIONED.value:
                    problems[ve.id] = pool.explain(req, need - len(chosen))
            report.assigned += self._assign(ctx, assignments, now)
        for ve in wanting:
            problem = problems.get(ve.id, "")
            if ve.deployment == Deployment.PARTITIONED.value or ve.id in failed_kept:
                continue  # the partition and state steps own these problems
            if not problem and ve.problem.startswith(EXPORT_PROBLEM):
                continue  # the exports step owns it
            if ve.reset_phase:
                continue  # its reset owns it while it runs (services.images.reset_ve)
            if ve.problem != problem:
                ve.problem = problem[:1024]
                ctx.session.add(ve)
        ctx.commit()

    @staticmethod
    def _images_not_ready(
        ctx: ServiceContext, wanting: list[VirtualEnvironment]
    ) -> tuple[dict[int, str], dict[int, int]]:
        """VEs whose filesystem image is being made (an auto image filling, a capture) or
        failed: no machine boots a half-made image. Their one-line problem; and the VEs
        that get the one machine that fills a local-disk image, with how many they may get
        (:func:`qrm_core.services.local_fill.fill_plan`)."""
        ids = {ve.fs_image_id for ve in wanting}
        rows = ctx.session.exec(
            select(FilesystemImage)
            .where(col(FilesystemImage.id).in_(ids))
            .where(FilesystemImage.state != ImageState.READY.value)
        ).all()
        pending = {row.id: (row.name, row.state, row.progress) for row in rows}
        problems, caps = local_fill.fill_plan(ctx, wanting, list(rows))
        for ve in wanting:
            if ve.id in caps or ve.id in problems:
                continue
            if ve.fs_image_id in pending and ve.id is not None:
                name, state, progress = pending[ve.fs_image_id]
                problems[ve.id] = (
                    f"creating its filesystem image {name}: {progress}"
                    if state == ImageState.CREATING.value
                    else f"its filesystem image {name} is not ready ({state}: {progress})"
                )
        return problems, caps

    def _candidates(self, ctx: ServiceContext) -> list[Candidate]:
        rows = ctx.session.exec(
            select(
                Resource.id,
                Resource.kind,
                Resource.hypervisor,
                Resource.cpus,
                Resource.memory_mb,
                Resource.host_id,
            )
            .where(Resource.state == S.IDLE.value, col(Resource.ve_id).is_(None))
            .where(col(Resource.pending_command).is_(None))
            # A host another manager keeps (an ESXi host) has no agent to boot a VE: it hosts partitions.
            .where(col(Resource.managed_by).is_(None))
        ).all()
        return [
            Candidate(
                id=rid, kind=kind, hypervisor=hv, cpus=cpus, memory_mb=mem, host_key=host if host else rid
            )
            for rid, kind, hv, cpus, mem, host in rows
        ]

    def _partitions_made_for(self, ctx: ServiceContext, ve_ids: list[int]) -> dict[int, frozenset[int]]:
        if not ve_ids:
            return {}
        made: dict[int, set[int]] = defaultdict(set)
        for ve_id, rid in ctx.session.exec(
            select(Partition.ve_id, Partition.resource_id).where(
                col(Partition.ve_id).in_(ve_ids), col(Partition.resource_id).is_not(None)
            )
        ):
            made[ve_id].add(rid)
        return {k: frozenset(v) for k, v in made.items()}

    def _assign(
        self, ctx: ServiceContext, assignments: list[tuple[VirtualEnvironment, Candidate]], now: datetime
    ) -> int:
        if not assignments:
            return 0
        # Each UPDATE is guarded (still idle, still free): a resource taken
        # meanwhile (another server, an operator) is not counted as placed.
        table = Resource.__table__  # type: ignore[attr-defined]
        connection = ctx.session.connection()
        taken: set[int] = set()
        if connection.dialect.update_returning:
            # One guarded UPDATE ... RETURNING per chunk instead of one round
            # trip per resource (PostgreSQL, SQLite; MariaDB has no UPDATE ...
            # RETURNING and takes the loop below).
            for start in range(0, len(assignments), _ASSIGN_CHUNK):
                chunk = assignments[start : start + _ASSIGN_CHUNK]
                ve_of = {cand.id: int(ve.id or 0) for ve, cand in chunk}
                batch = (
                    sa.update(table)
                    .where(
                        table.c.id.in_(list(ve_of)),
                        table.c.state == S.IDLE.value,
                        table.c.ve_id.is_(None),
                    )
                    .values(
                        ve_id=sa.case(ve_of, value=table.c.id),
                        state=S.ASSIGNED.value,
                        boot_generation=table.c.boot_generation + 1,
                        state_changed_at=now,
                    )
                    .returning(table.c.id)
                )
                taken.update(connection.execute(batch).scalars())
        else:
            statement = (
                sa.update(table)
                .where(
                    table.c.id == sa.bindparam("rid"),
                    table.c.state == S.IDLE.value,
                    table.c.ve_id.is_(None),
                )
                .values(
                    ve_id=sa.bindparam("ve"),
                    state=S.ASSIGNED.value,
                    boot_generation=table.c.boot_generation + 1,
                    state_changed_at=now,
                )
            )
            for ve, cand in assignments:
                if connection.execute(statement, {"rid": cand.id, "ve": ve.id}).rowcount == 1:
                    taken.add(cand.id)
        assigned: list[tuple[VirtualEnvironment, int]] = []
        for ve, cand in assignments:
            if cand.id in taken:
                assigned.append((ve, cand.id))
                self.exports.expect(cand.id, int(ve.id or 0))
        ctx.record_fast(
            "ve",
            [(ve.name, f"resource {rid} assigned to {ve.name}; reboot ordered") for ve, rid in assigned],
        )
        done = len(assigned)
        if assigned and (
            ctx.hooks.wants("qrm_ve_resource_assigned") or ctx.hooks.wants("qrm_resource_state_changed")
        ):

            def notify() -> None:
                for ve, rid in assigned:
                    row = ctx.session.get(Resource, rid)
                    if row is None:
                        continue
                    ctx.session.refresh(row)
                    res_public = public.one_resource(ctx.session, row)
                    ctx.hooks.resource_state_changed(res_public, S.IDLE.value, ctx.hook_ctx)
                    ctx.hooks.ve_resource_assigned(public.one_ve(ctx.session, ve), res_public, ctx.hook_ctx)

            ctx.after_commit(notify)
        return done
