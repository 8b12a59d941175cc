"""The reconciler: drives every VE's actual state towards its desired state.

One pass (:meth:`Reconciler.tick`) runs these steps, each in its own
transaction, each idempotent, so a server killed at any point continues
correctly after restart (the database is the only memory):

1. **Failure detection** - a live resource whose heartbeats stopped for longer
   than its timeout goes to ``error``.
2. **Failover and fencing** - a failed member of a VE with failover on (or of a
   stopping VE) is fenced (a VM is powered off through its hypervisor driver),
   released, and its boot generation raised, so it can never serve the VE
   again unless re-assigned. Without failover it stays bound (the VE is
   degraded) and resumes if its heartbeats do.
3. **Placement** - every VE that should run and is short of resources gets
   idle resources meeting its requirements (one query, then in-memory
   matching); each assignment is a guarded update (``WHERE state = 'idle' AND
   ve_id IS NULL``), so two engines, or an engine and an operator, can never
   put one resource into two VEs. A VE that cannot be placed gets a one-line
   ``problem`` saying why.
4. **Partitions** - a partitioned VE with no idle VM of its hypervisor gets a
   new partition on the least loaded host: the partition row is written first
   (state ``creating``), then the driver creates and starts it; a pass that
   finds a ``creating`` row finishes the job.
5. **VE states** - starting / running / degraded / stopping / stopped are
   derived from the members, and the started/stopped hooks fire on change.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlmodel import col, select

from qrm_core.drivers.base import PartitionSpec
from qrm_core.engine.scheduler import Candidate, CandidatePool, Requirements
from qrm_core.errors import QrmError
from qrm_core.models import (
    Deployment,
    EventLevel,
    Partition,
    PartitionState,
    Resource,
    ResourceState,
    VEDesiredState,
    VEState,
    VirtualEnvironment,
    utcnow,
)
from qrm_core.services import ServiceContext, public, service_context
from qrm_core.services.agent import release
from qrm_core.services.partitions import host_target
from qrm_core.services.resources import transition

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem

log = logging.getLogger("qrm.engine")
_ASSIGN_CHUNK = 500  # resources per UPDATE ... RETURNING when placing

S = ResourceState
LIVE = (S.IDLE.value, S.ASSIGNED.value, S.BOOTING.value, S.ACTIVE.value)
BOUND_STATES = (S.ASSIGNED.value, S.BOOTING.value, S.ACTIVE.value)


@dataclass
class TickReport:
    failed: int = 0
    released: int = 0
    assigned: int = 0
    partitions_created: int = 0
    ve_changes: int = 0
    durations: dict[str, float] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return sum(self.durations.values())

    @property
    def busy(self) -> bool:
        return bool(
            self.failed or self.released or self.assigned or self.partitions_created or self.ve_changes
        )


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
        # resource id -> VE id whose filesystem image it must be given access to
        self._exports: dict[int, int] = {}
        self._export_failures: dict[int, str] = {}
        self._exports_verified = False

    def became_leader(self) -> None:
        """Re-check every member's export on the next pass (a previous leader may
        have died between an assignment and its export)."""
        self._exports_verified = False

    def tick(self) -> TickReport:
        report = TickReport()
        now = self.clock()
        for name, step in (
            ("failures", self._detect_failures),
            ("failover", self._failover),
            ("placement", self._place),
            ("exports", self._export),
            ("partitions", self._partitions),
            ("states", self._derive_states),
        ):
            started = time.perf_counter()
            with service_context(self.settings, actor="engine", plugins=self.plugins) as ctx:
                step(ctx, now, report)
            report.durations[name] = time.perf_counter() - started
        return report

    # -- 1. failure detection -------------------------------------------

    def _detect_failures(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
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
            timeout = booting if rebooting else (row.heartbeat_timeout or default)
            assert row.last_seen is not None
            silent = (now - row.last_seen).total_seconds()
            if silent > timeout:
                what = "did not come back from the reboot" if rebooting else "no heartbeat"
                transition(ctx, row, S.ERROR, f"{what} for {silent:.0f} s (timeout {timeout:.0f} s)")
                report.failed += 1
        ctx.commit()

    # -- 2. failover and fencing ----------------------------------------

    def _failover(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        failed = ctx.session.exec(
            select(Resource)
            .where(Resource.state == S.ERROR.value, col(Resource.ve_id).is_not(None))
            .order_by(col(Resource.id))
            .with_for_update(skip_locked=True)
        ).all()
        if not failed:
            return
        ves = {
            ve.id: ve
            for ve in ctx.session.exec(
                select(VirtualEnvironment).where(col(VirtualEnvironment.id).in_({r.ve_id for r in failed}))
            )
        }
        for row in failed:
            ve = ves[row.ve_id]
            if ve.failover or ve.desired_state == VEDesiredState.STOPPED.value:
                self._fence(ctx, row)
                why = "failed; failover" if ve.failover else "failed while its VE stopped"
                release(ctx, row, why, reboot=True)
                report.released += 1
        ctx.commit()

    def _fence(self, ctx: ServiceContext, row: Resource) -> None:
        """Make sure a failed VM cannot keep serving: power its partition off."""
        partition = ctx.session.exec(select(Partition).where(Partition.resource_id == row.id)).first()
        if partition is None:
            return  # a physical machine: its raised boot generation keeps it out
        host = ctx.session.get(Resource, partition.host_id)
        assert host is not None
        try:
            ctx.plugins.hypervisor_driver(partition.hypervisor).stop_partition(
                host_target(host), partition.name, force=True
            )
        except QrmError as exc:
            ctx.record(
                "partition",
                partition.name,
                f"could not fence partition {partition.name} on {public.resource_label(host)}: {exc.message}",
                level=EventLevel.ERROR,
            )
            return
        old = partition.state
        partition.state = PartitionState.STOPPED.value
        ctx.session.add(partition)
        ctx.record("partition", partition.name, f"partition {partition.name} fenced (powered off)")
        if ctx.hooks.wants("qrm_partition_state_changed"):
            ctx.after_commit(
                lambda: ctx.hooks.partition_state_changed(
                    public.partitions(ctx.session, [partition])[0], old, ctx.hook_ctx
                )
            )

    # -- 3. placement ----------------------------------------------------

    def _place(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
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
        short = [ve for ve in wanting if bound[ve.id] < ve.pool_size]
        problems: dict[int, str] = {}
        if short:
            pool = CandidatePool(self._candidates(ctx))
            made_for = self._partitions_made_for(
                ctx, [ve.id for ve in short if ve.deployment == "partitioned"]
            )
            assignments: list[tuple[VirtualEnvironment, Candidate]] = []
            for ve in short:
                need = ve.pool_size - bound[ve.id]
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
                if len(chosen) < need and ve.deployment != Deployment.PARTITIONED.value:
                    problems[ve.id] = pool.explain(req, need - len(chosen))
            report.assigned += self._assign(ctx, assignments, now)
        for ve in wanting:
            problem = problems.get(ve.id, "")
            if ve.deployment == Deployment.PARTITIONED.value or ve.id in failed_kept:
                continue  # the partition and state steps own these problems
            if ve.problem != problem:
                ve.problem = problem[:1024]
                ctx.session.add(ve)
        ctx.commit()

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
                self._exports[cand.id] = int(ve.id or 0)
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

    # -- exports ---------------------------------------------------------

    def _export(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        """Give newly assigned resources access to their VE's filesystem image.

        Three phases, so that no storage driver call runs inside a database
        transaction (on SQLite an open write transaction stops every
        registration and heartbeat; 1,000 exports at 0.1 s each would stop
        them for minutes): read what each export needs, commit; call the
        drivers; record the outcomes, and withdraw an access granted to a
        resource that left its VE meanwhile.
        """
        from qrm_core.services.storage import VolumeAccess, volume_access

        if not self._exports_verified:
            for rid, ve_id in ctx.session.exec(
                select(Resource.id, Resource.ve_id).where(
                    col(Resource.ve_id).is_not(None), col(Resource.state).in_(BOUND_STATES)
                )
            ):
                self._exports.setdefault(rid, ve_id)
            self._exports_verified = True
        planned: list[tuple[int, int, VolumeAccess]] = []
        outcomes: dict[int, str | None] = {}  # resource id -> error message, None when granted
        for rid, ve_id in sorted(self._exports.items()):
            row = ctx.session.get(Resource, rid)
            if row is None or row.ve_id != ve_id:
                self._exports.pop(rid, None)
                self._export_failures.pop(rid, None)
                continue
            try:
                planned.append((rid, ve_id, volume_access(ctx, ve_id, row)))
            except QrmError as exc:
                outcomes[rid] = exc.message
        if not planned and not outcomes:
            ctx.commit()
            return
        ctx.commit()  # no transaction stays open across the driver calls
        granted: dict[int, VolumeAccess] = {}
        for rid, _ve_id, access in planned:
            try:
                access.grant()
            except QrmError as exc:
                outcomes[rid] = exc.message
            else:
                outcomes[rid] = None
                granted[rid] = access
        left: list[VolumeAccess] = []
        for rid, message in sorted(outcomes.items()):
            ve_id = self._exports[rid]
            row = ctx.session.get(Resource, rid, populate_existing=True)
            if row is None or row.ve_id != ve_id:
                # Released while its export was made: take the access back.
                self._exports.pop(rid, None)
                self._export_failures.pop(rid, None)
                if rid in granted:
                    left.append(granted[rid])
                continue
            if message is not None:
                if self._export_failures.get(rid) != message:
                    self._export_failures[rid] = message
                    ve = ctx.session.get(VirtualEnvironment, ve_id)
                    ctx.record(
                        "ve",
                        ve.name if ve else str(ve_id),
                        f"cannot export the filesystem image to {public.resource_label(row)}: {message}",
                        level=EventLevel.ERROR,
                    )
                    if ve is not None:
                        self._set_problem(
                            ctx,
                            ve,
                            f"cannot export the filesystem image to {public.resource_label(row)}: {message}",
                        )
                continue
            self._exports.pop(rid, None)
            if self._export_failures.pop(rid, None) is not None:
                ve = ctx.session.get(VirtualEnvironment, ve_id)
                if ve is not None:
                    self._set_problem(ctx, ve, "")
        ctx.commit()
        for access in left:
            try:
                access.withdraw()
            except QrmError as exc:
                log.warning("could not withdraw an export from %s: %s", access.client.mac, exc.message)

    # -- 4. partitions ---------------------------------------------------

    def _partitions(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        # Finish partitions a previous pass (or a killed server) left half made.
        for partition in ctx.session.exec(
            select(Partition)
            .where(Partition.state == PartitionState.CREATING.value)
            .order_by(col(Partition.id))
        ).all():
            self._realize_partition(ctx, partition)
        partitioned = ctx.session.exec(
            select(VirtualEnvironment)
            .where(
                VirtualEnvironment.desired_state == VEDesiredState.RUNNING.value,
                VirtualEnvironment.deployment == Deployment.PARTITIONED.value,
            )
            .order_by(col(VirtualEnvironment.id))
        ).all()
        for ve in partitioned:
            members = ctx.session.exec(
                select(sa.func.count()).select_from(Resource).where(Resource.ve_id == ve.id)
            ).one()
            if members >= ve.pool_size:
                self._set_problem(ctx, ve, "")
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
                self._set_problem(
                    ctx,
                    ve,
                    f"waiting for partition {p.name} on {public.resource_label(host) if host else '?'} to boot",
                )
                continue
            if self._create_partition(ctx, ve):
                report.partitions_created += 1
        ctx.commit()

    def _not_yet_idle(self, ctx: ServiceContext, partition: Partition) -> bool:
        row = ctx.session.get(Resource, partition.resource_id)
        return row is not None and row.state in (S.NEW.value, S.OFF.value)

    def _set_problem(self, ctx: ServiceContext, ve: VirtualEnvironment, problem: str) -> None:
        if ve.problem != problem:
            ve.problem = problem[:1024]
            ctx.session.add(ve)

    def _create_partition(self, ctx: ServiceContext, ve: VirtualEnvironment) -> bool:
        hypervisor = ve.req_hypervisor
        assert hypervisor is not None
        driver = ctx.plugins.hypervisor_driver(hypervisor)
        failed_hosts = set(
            ctx.session.exec(
                select(Partition.host_id).where(
                    Partition.ve_id == ve.id, Partition.state == PartitionState.ERROR.value
                )
            ).all()
        )
        hosts = [
            r
            for r in ctx.session.exec(
                select(Resource).where(col(Resource.state).in_(LIVE)).order_by(col(Resource.id))
            ).all()
            if hypervisor in (r.capabilities or []) and r.id not in failed_hosts
        ]
        if not hosts:
            self._set_problem(ctx, ve, f"no live host runs hypervisor {hypervisor}")
            return False
        best: tuple[int, Resource] | None = None
        notes: list[str] = []
        for host in hosts:
            try:
                info = driver.host_info(host_target(host))
            except QrmError as exc:
                notes.append(f"{public.resource_label(host)}: {exc.message}")
                continue
            if info.free_memory_mb >= ve.req_memory_mb and info.cpus >= ve.req_cpus:
                if best is None or info.free_memory_mb > best[0]:
                    best = (info.free_memory_mb, host)
            else:
                notes.append(f"{public.resource_label(host)} has {info.free_memory_mb} MB free")
        if best is None:
            self._set_problem(
                ctx,
                ve,
                f"no host of hypervisor {hypervisor} has room for {ve.req_cpus} CPUs and "
                f"{ve.req_memory_mb} MB ({'; '.join(notes)})",
            )
            return False
        host = best[1]
        partition = Partition(
            name=self._partition_name(ctx, ve, host),
            host_id=host.id,
            hypervisor=hypervisor,
            cpus=max(ve.req_cpus, 1),
            memory_mb=max(ve.req_memory_mb, 1),
            mac=self._new_mac(ctx),
            state=PartitionState.CREATING.value,
            ve_id=ve.id,
        )
        ctx.session.add(partition)
        ctx.record(
            "partition",
            partition.name,
            f"creating partition {partition.name} for {ve.name} on {public.resource_label(host)}",
        )
        self._set_problem(ctx, ve, f"creating partition {partition.name} on {public.resource_label(host)}")
        ctx.commit()  # durable before the driver acts
        self._realize_partition(ctx, partition)
        return True

    def _realize_partition(self, ctx: ServiceContext, partition: Partition) -> None:
        """Create and start a partition recorded as ``creating``; safe to repeat."""
        host = ctx.session.get(Resource, partition.host_id)
        assert host is not None
        target = host_target(host)
        try:
            driver = ctx.plugins.hypervisor_driver(partition.hypervisor)
            existing = {p.name: p for p in driver.list_partitions(target)}
            if partition.name not in existing:
                driver.create_partition(
                    target,
                    PartitionSpec(
                        name=partition.name,
                        cpus=partition.cpus,
                        memory_mb=partition.memory_mb,
                        mac=partition.mac,
                    ),
                )
            if existing.get(partition.name) is None or existing[partition.name].state != "running":
                driver.start_partition(target, partition.name)
        except QrmError as exc:
            partition.state = PartitionState.ERROR.value
            ctx.session.add(partition)
            ctx.record(
                "partition",
                partition.name,
                f"partition {partition.name} on {public.resource_label(host)} failed: {exc.message}",
                level=EventLevel.ERROR,
            )
            ctx.commit()
            return
        partition.state = PartitionState.RUNNING.value
        ctx.session.add(partition)
        ctx.record(
            "partition",
            partition.name,
            f"partition {partition.name} started on {public.resource_label(host)}",
        )
        ctx.commit()
        if ctx.hooks.wants("qrm_partition_created"):
            ctx.hooks.partition_created(public.partitions(ctx.session, [partition])[0], ctx.hook_ctx)

    def _partition_name(self, ctx: ServiceContext, ve: VirtualEnvironment, host: Resource) -> str:
        taken = set(ctx.session.exec(select(Partition.name).where(Partition.host_id == host.id)).all())
        n = 1
        while f"{ve.name}-{n}" in taken:
            n += 1
        return f"{ve.name[:56]}-{n}"

    def _new_mac(self, ctx: ServiceContext) -> str:
        while True:
            mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
            clash = (
                ctx.session.exec(select(Partition.id).where(Partition.mac == mac)).first()
                or ctx.session.exec(select(Resource.id).where(Resource.mac == mac)).first()
            )
            if not clash:
                return mac

    # -- 5. VE states ------------------------------------------------------

    def _derive_states(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        counts: dict[int, Counter[str]] = defaultdict(Counter)
        for ve_id, state, n in ctx.session.exec(
            select(Resource.ve_id, Resource.state, sa.func.count())
            .where(col(Resource.ve_id).is_not(None))
            .group_by(Resource.ve_id, Resource.state)
        ):
            counts[ve_id][state] += n
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
            elif active >= ve.pool_size:
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
                self._set_problem(
                    ctx,
                    ve,
                    "resource(s) "
                    + ", ".join(public.resource_label(r) for r in failing)
                    + " stopped responding (failover is off)",
                )
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
