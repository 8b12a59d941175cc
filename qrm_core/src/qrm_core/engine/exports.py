"""Exports (after placement): give new members access to their VE's filesystem image.

Three phases, so that no storage driver call runs inside a database
transaction (on SQLite an open write transaction stops every registration
and heartbeat; 1,000 exports at 0.1 s each would stop them for minutes): read
what each export needs, commit; call the drivers, one batch per storage
server (``export_volumes``: a driver that reloads its server's configuration
does it once per batch); record the outcomes, and withdraw an access granted
to a resource that left its VE meanwhile. A failed export stays queued (tried
again next pass) and shows as the VE's problem until it succeeds; a VE is
not ``running`` while a member's export is missing (:meth:`Exports.unexported`,
read by the state step). A VE being stopped gets no more exports.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime

from sqlmodel import col, select

from qrm_core.drivers.base import ExportRequest
from qrm_core.engine.common import BOUND_STATES, TickReport, set_problem
from qrm_core.errors import QrmError
from qrm_core.models import EventLevel, Resource, VEDesiredState, VirtualEnvironment
from qrm_core.services import ServiceContext, public
from qrm_core.services.storage import VolumeAccess, volume_access

log = logging.getLogger("qrm.engine")

#: How a VE's problem about an export begins (the placement step leaves such a problem alone).
EXPORT_PROBLEM = "cannot export the filesystem image to "


class Exports:
    name = "exports"

    def __init__(self) -> None:
        # resource id -> VE id whose filesystem image it must be given access to
        self.pending: dict[int, int] = {}
        self.failures: dict[int, str] = {}
        # resource id -> the VE's problem its failed export makes
        self.problems: dict[int, str] = {}
        self.verified = False

    def expect(self, resource_id: int, ve_id: int) -> None:
        """Queue an export for a resource just assigned to a VE."""
        self.pending[resource_id] = ve_id

    def forget(self, resource_id: int) -> None:
        self.pending.pop(resource_id, None)
        self.failures.pop(resource_id, None)
        self.problems.pop(resource_id, None)

    def unexported(self) -> dict[int, str]:
        """The VEs with a member whose export is missing: VE id -> the first
        failure's problem (empty while an export is queued and not yet tried)."""
        result: dict[int, str] = {}
        for rid, ve_id in sorted(self.pending.items()):
            if not result.get(ve_id):
                result[ve_id] = self.problems.get(rid, "")
        return result

    def run(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        if not self.verified:
            # A previous leader may have died between an assignment and its export.
            for rid, ve_id in ctx.session.exec(
                select(Resource.id, Resource.ve_id).where(
                    col(Resource.ve_id).is_not(None), col(Resource.state).in_(BOUND_STATES)
                )
            ):
                self.pending.setdefault(rid, ve_id)
            self.verified = True
        planned: dict[int, VolumeAccess] = {}
        outcomes: dict[int, str | None] = {}  # resource id -> error message, None when granted
        stopping = set(
            ctx.session.exec(
                select(VirtualEnvironment.id).where(
                    VirtualEnvironment.desired_state == VEDesiredState.STOPPED.value,
                    col(VirtualEnvironment.id).in_(set(self.pending.values())),
                )
            ).all()
        )
        for rid, ve_id in sorted(self.pending.items()):
            row = ctx.session.get(Resource, rid)
            if row is None or row.ve_id != ve_id or ve_id in stopping:
                self.forget(rid)
                continue
            try:
                planned[rid] = volume_access(ctx, ve_id, row)
            except QrmError as exc:
                outcomes[rid] = exc.message
        ctx.commit()  # no transaction stays open across the driver calls
        if not planned and not outcomes:
            return
        granted = self._grant(planned, outcomes)
        left: list[VolumeAccess] = []
        touched: set[int] = set()
        for rid, message in sorted(outcomes.items()):
            ve_id = self.pending[rid]
            row = ctx.session.get(Resource, rid, populate_existing=True)
            if row is None or row.ve_id != ve_id:
                # Released while its export was made: take the access back.
                self.forget(rid)
                if rid in granted:
                    left.append(granted[rid])
                continue
            touched.add(ve_id)
            if message is not None:
                problem = f"{EXPORT_PROBLEM}{public.resource_label(row)}: {message}"
                self.problems[rid] = problem
                if self.failures.get(rid) != message:
                    self.failures[rid] = message
                    ve = ctx.session.get(VirtualEnvironment, ve_id)
                    ctx.record("ve", ve.name if ve else str(ve_id), problem, level=EventLevel.ERROR)
                continue
            self.pending.pop(rid, None)
            self.failures.pop(rid, None)
            self.problems.pop(rid, None)
        # One problem per VE: a member's export that still fails, not the one that
        # succeeded last; none when every member has its export.
        unexported = self.unexported()
        for ve_id in sorted(touched):
            ve = ctx.session.get(VirtualEnvironment, ve_id)
            if ve is None:
                continue
            problem = unexported.get(ve_id, "")
            if problem or ve.problem.startswith(EXPORT_PROBLEM):
                set_problem(ctx, ve, problem)
        ctx.commit()
        for access in left:
            try:
                access.withdraw()
            except QrmError as exc:
                log.warning("could not withdraw an export from %s: %s", access.client.mac, exc.message)

    @staticmethod
    def _grant(planned: dict[int, VolumeAccess], outcomes: dict[int, str | None]) -> dict[int, VolumeAccess]:
        """Export in one batch per storage server; fills ``outcomes``, returns what was granted."""
        batches: dict[tuple[str, str], list[int]] = defaultdict(list)
        for rid, access in planned.items():
            batches[(access.target.type, access.target.name)].append(rid)
        granted: dict[int, VolumeAccess] = {}
        for rids in batches.values():
            first = planned[rids[0]]
            requests = [ExportRequest(planned[rid].location, planned[rid].client) for rid in rids]
            try:
                results = first.driver.export_volumes(first.target, requests)
            except QrmError as exc:  # the whole batch failed (the server is unreachable)
                outcomes.update(dict.fromkeys(rids, exc.message))
                continue
            for rid, result in zip(rids, results, strict=True):
                outcomes[rid] = result.error.message if result.error is not None else None
                if result.error is None:
                    granted[rid] = planned[rid]
        return granted
