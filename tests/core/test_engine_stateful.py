"""A hypothesis state machine over the engine: random registrations, nodes dying
and coming back, VE starts, stops and pool resizes, with invariants after every
step and convergence checked whenever the world is left alone long enough.

Nodes follow the agent protocol through the services (tests/core/enginekit.py)
with a fake clock, so a minute of heartbeats takes milliseconds.
"""

from __future__ import annotations

from collections import Counter

import pytest
from enginekit import Site
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlmodel import select

from qrm_core import db
from qrm_core.models import Resource, VirtualEnvironment
from qrm_core.services import boot_images, service_context, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import empty_database

VE_NAMES = ["a", "b", "c", "d"]
MACS = [f"52:54:00:00:01:{i:02x}" for i in range(1, 7)]


class EngineMachine(RuleBasedStateMachine):
    settings_obj = None
    plugins_obj = None

    @initialize(
        memories=st.lists(st.sampled_from([512, 2048]), min_size=2, max_size=5),
        specs=st.lists(
            st.tuples(st.booleans(), st.integers(1, 3), st.booleans(), st.sampled_from([0, 1024])),
            min_size=1,
            max_size=3,
        ),
    )
    def setup(self, memories: list[int], specs: list[tuple[bool, int, bool, int]]) -> None:
        """A site with machines and running VEs: the random steps then disturb it."""
        empty_database(db.get_engine(self.settings_obj))
        with service_context(self.settings_obj, plugins=self.plugins_obj) as ctx:
            storage.add_storage(ctx, name="st", type="fake", address="10.0.0.2")
            storage.add_filesystem_image(ctx, name="root", storage="st", location="/r")
            boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")
        self.site = Site(self.settings_obj, self.plugins_obj)
        self.desired: dict[str, str] = {}
        self.pools: dict[str, int] = {}
        self.failover: dict[str, bool] = {}
        self.quiet_steps = 0
        for mac, memory in zip(MACS, memories, strict=False):
            self.site.add_node(mac, memory_mb=memory)
        for name, (shared, pool, failover, memory) in zip(VE_NAMES, specs, strict=False):
            self.create(name, shared, pool, failover, memory)
            self.start_named(name)
        self.site.settle(3)

    # -- what operators and machines do ---------------------------------

    @rule(mac=st.sampled_from(MACS), memory=st.sampled_from([512, 2048]))
    def power_on(self, mac: str, memory: int) -> None:
        node = self.site.nodes.get(mac)
        if node is None:
            self.site.add_node(mac, memory_mb=memory)
        elif not node.alive:
            node.alive = True
            node.token = None  # a real reboot: it boots and registers again
        self.quiet_steps = 0

    @rule(mac=st.sampled_from(MACS))
    def power_off(self, mac: str) -> None:
        node = self.site.nodes.get(mac)
        if node is not None:
            node.alive = False
        self.quiet_steps = 0

    @rule(data=st.data())
    def kill_a_member(self, data) -> None:
        """The interesting failure: a machine serving a VE dies."""
        resources, _ = self._snapshot()
        serving = sorted(r.mac for r in resources if r.ve_id is not None and self.site.nodes[r.mac].alive)
        if serving:
            self.site.nodes[data.draw(st.sampled_from(serving))].alive = False
            self.quiet_steps = 0

    @rule(
        name=st.sampled_from(VE_NAMES),
        shared=st.booleans(),
        pool=st.integers(1, 3),
        failover=st.booleans(),
        memory=st.sampled_from([0, 1024]),
    )
    def create(self, name: str, shared: bool, pool: int, failover: bool, memory: int) -> None:
        if name in self.desired:
            return
        with service_context(self.settings_obj, plugins=self.plugins_obj) as ctx:
            ves.create_ve(
                ctx,
                name=name,
                boot_image="idle",
                fs_image="root",
                deployment="shared" if shared else "single",
                pool_size=pool if shared else None,
                failover=failover,
                memory_mb=memory,
            )
        self.desired[name] = "stopped"
        self.pools[name] = pool if shared else 1
        self.failover[name] = failover

    def start_named(self, name: str) -> None:
        with service_context(self.settings_obj, plugins=self.plugins_obj) as ctx:
            ves.start_ve(ctx, name)
        self.desired[name] = "running"
        self.quiet_steps = 0

    @precondition(lambda self: self.desired)
    @rule(data=st.data())
    def start(self, data) -> None:
        self.start_named(data.draw(st.sampled_from(sorted(self.desired))))

    @precondition(lambda self: self.desired)
    @rule(data=st.data())
    def stop(self, data) -> None:
        name = data.draw(st.sampled_from(sorted(self.desired)))
        with service_context(self.settings_obj, plugins=self.plugins_obj) as ctx:
            ves.stop_ve(ctx, name)
        self.desired[name] = "stopped"
        self.quiet_steps = 0

    @precondition(lambda self: self.desired)
    @rule(data=st.data(), size=st.integers(1, 3))
    def resize(self, data, size: int) -> None:
        shared = [n for n in sorted(self.desired) if self._deployment(n) == "shared"]
        if not shared:
            return
        name = data.draw(st.sampled_from(shared))
        with service_context(self.settings_obj, plugins=self.plugins_obj) as ctx:
            ves.resize_ve(ctx, name, size)
        self.pools[name] = size
        self.quiet_steps = 0

    @rule(seconds=st.sampled_from([1.0, 5.0, 20.0]))
    def time_passes(self, seconds: float) -> None:
        self.site.step(seconds)
        self.quiet_steps += 1

    # -- invariants --------------------------------------------------------

    def _deployment(self, name: str) -> str:
        with service_context(self.settings_obj, plugins=self.plugins_obj) as ctx:
            return ves.show_ve(ctx, name).deployment

    def _snapshot(self):
        with service_context(self.settings_obj, plugins=self.plugins_obj) as ctx:
            resources = ctx.session.exec(select(Resource)).all()
            ve_rows = {v.id: v for v in ctx.session.exec(select(VirtualEnvironment)).all()}
            ctx.session.commit()  # end the read; loaded attributes stay (expire_on_commit is off)
        return resources, ve_rows

    @invariant()
    def no_lost_ve_and_pools_never_overfilled(self) -> None:
        if not hasattr(self, "site"):
            return
        resources, ve_rows = self._snapshot()
        assert {v.name for v in ve_rows.values()} == set(self.desired)
        for ve in ve_rows.values():
            assert ve.desired_state == self.desired[ve.name]
        members = Counter(r.ve_id for r in resources if r.ve_id is not None)
        for ve_id, count in members.items():
            assert count <= ve_rows[ve_id].pool_size, f"{ve_rows[ve_id].name} has {count} members"
        for r in resources:
            if r.state in ("assigned", "booting", "active"):
                assert r.ve_id is not None
            if r.ve_id is not None:
                ve = ve_rows[r.ve_id]
                assert r.memory_mb >= ve.req_memory_mb and r.cpus >= ve.req_cpus, (
                    f"{r.mac} ({r.memory_mb} MB) serves {ve.name}, which needs {ve.req_memory_mb} MB"
                )
            node = self.site.nodes[r.mac]
            # A machine that answers as running a VE runs the VE qrm assigned it.
            if node.alive and node.mode == "ve" and r.state == "active":
                assert ve_rows[r.ve_id].name == node.ve

    def teardown(self) -> None:
        if hasattr(self, "site"):
            self.left_alone()

    def left_alone(self) -> None:
        """Nothing changes for a while: running VEs get fully placed when there is
        room, stopped VEs hold nothing, and failed nodes are out."""
        quiet = max(self.site.settings.heartbeat_timeout, self.site.settings.boot_timeout)
        for _ in range(int(quiet // 5) + 8):
            self.site.step(5.0)
        resources, ve_rows = self._snapshot()
        by_name = {v.name: v for v in ve_rows.values()}
        members: dict[int, list[Resource]] = {}
        for r in resources:
            if r.ve_id is not None:
                members.setdefault(r.ve_id, []).append(r)
        alive = {m for m, n in self.site.nodes.items() if n.alive}
        for r in resources:
            if r.mac not in alive:
                assert r.state == "error" or r.state == "new", f"dead {r.mac} is {r.state}"
                if r.ve_id is not None:
                    assert not self.failover[ve_rows[r.ve_id].name], "failed member kept despite failover"
        free = [r for r in resources if r.mac in alive and r.ve_id is None and r.state == "idle"]
        for name, desired in self.desired.items():
            ve = by_name[name]
            mine = members.get(ve.id, [])
            if desired == "stopped":
                assert mine == [] and ve.state == "stopped", f"{name}: {ve.state} with {len(mine)}"
                continue
            if self.failover[name]:
                assert not [r for r in mine if r.state == "error"], (
                    f"{name} kept a failed member despite failover"
                )
            active = [r for r in mine if r.state == "active"]
            fits = [r for r in free if r.memory_mb >= ve.req_memory_mb]
            if len(mine) < ve.pool_size:
                # Short only while nothing that fits is idle.
                assert not fits, f"{name} short ({len(mine)}/{ve.pool_size}) with {len(fits)} fitting idle"
                assert ve.problem, f"{name} short without a problem saying why"
            if all(r.state == "active" for r in mine) and len(mine) == ve.pool_size:
                assert ve.state == "running", f"{name} is {ve.state} with all members active"
            del active
        self.quiet_steps = 0


@pytest.mark.slow
@pytest.mark.qrm_backends("sqlite")  # explores fast on SQLite; the concurrency tests cover the others
def test_engine_state_machine(qrm_settings, qrm_plugins) -> None:
    EngineMachine.settings_obj = qrm_settings
    EngineMachine.plugins_obj = qrm_plugins
    test = EngineMachine.TestCase
    test.settings = settings(
        max_examples=40,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    test().runTest()
