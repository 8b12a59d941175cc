"""A hypothesis state machine over the engine: random registrations, nodes dying
and coming back, VE starts, stops and pool resizes, partitions added, paused,
resumed, migrated and removed on hypervisor hosts that may die, with
invariants after every step and convergence checked whenever the world is
left alone long enough.

Nodes follow the agent protocol through the services (tests/core/enginekit.py)
with a fake clock, so a minute of heartbeats takes milliseconds. Partitions'
VMs are nodes too: they boot when their partition starts, fall silent when it
is paused or its host dies. The hypervisor is the fake one, told which hosts
are dead (a call to a dead host fails, as a real one would).
"""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
from enginekit import Site
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlmodel import select

from qrm_core import db
from qrm_core.config import Settings
from qrm_core.drivers.base import HostTarget
from qrm_core.drivers.fake import FakeHypervisor
from qrm_core.errors import DriverError, QrmError
from qrm_core.models import Partition, Resource, VirtualEnvironment
from qrm_core.plugins import HYPERVISOR_GROUP
from qrm_core.services import boot_images, service_context, storage
from qrm_core.services import partitions as parts
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import empty_database

VE_NAMES = ["a", "b", "c", "d"]
MACS = [f"52:54:00:00:01:{i:02x}" for i in range(1, 7)]
HOST_MACS = ["52:54:00:00:02:01", "52:54:00:00:02:02"]


class MortalHypervisor(FakeHypervisor):
    """The fake hypervisor, with hosts that can die: every call about a dead host fails."""

    name = "fake"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.dead: set[str] = set()

    def __getattribute__(self, name: str):
        attribute = super().__getattribute__(name)
        if (
            name.startswith("_")
            or name in ("dead", "settings", "name", "description")
            or not callable(attribute)
        ):
            return attribute

        def guarded(*args, **kwargs):
            for target in (*args, *kwargs.values()):
                if getattr(target, "mac", None) in self.dead:
                    raise DriverError(f"host {target.label} does not answer")
            return attribute(*args, **kwargs)

        return guarded


class EngineMachine(RuleBasedStateMachine):
    settings_obj = None
    plugins_obj = None
    hypervisor: MortalHypervisor

    @initialize(
        memories=st.lists(st.sampled_from([512, 2048]), min_size=2, max_size=5),
        specs=st.lists(
            st.tuples(st.booleans(), st.integers(1, 3), st.booleans(), st.sampled_from([0, 1024])),
            min_size=1,
            max_size=3,
        ),
        partitioned=st.lists(st.sampled_from(HOST_MACS), min_size=1, max_size=3),
    )
    def setup(
        self, memories: list[int], specs: list[tuple[bool, int, bool, int]], partitioned: list[str]
    ) -> None:
        """A site with machines and running VEs: the random steps then disturb it."""
        empty_database(db.get_engine(self.settings_obj))
        with service_context(self.settings_obj, plugins=self.plugins_obj) as ctx:
            storage.add_storage(ctx, name="st", type="fake", address="10.0.0.2")
            for name in VE_NAMES:  # one image each: a VE that writes its image has it alone
                storage.add_filesystem_image(ctx, name=f"root-{name}", storage="st", location=f"/r-{name}")
            boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")
        self.site = Site(self.settings_obj, self.plugins_obj)
        self.desired: dict[str, str] = {}
        self.pools: dict[str, int] = {}
        self.failover: dict[str, bool] = {}
        self.quiet_steps = 0
        self.hypervisor.dead.clear()
        shutil.rmtree(self.settings_obj.state_dir / "fake-hypervisor", ignore_errors=True)
        self.partition_hosts: dict[str, str] = {}  # partition VM MAC -> host MAC, as the hypervisor says
        for mac in HOST_MACS:
            self.site.add_node(mac, cpus=4, memory_mb=4096, hypervisors=["fake"])
        for mac, memory in zip(MACS, memories, strict=False):
            self.site.add_node(mac, memory_mb=memory)
        for host in partitioned:  # partitions from the start, for the partition rules to work on
            self.add_partitions(host, 1, 512)
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
                fs_image=f"root-{name}",
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

    # -- partitions ----------------------------------------------------------

    def _service(self, action, *args, **kwargs):
        """Run a partition operation as an operator would; a refusal changes nothing and is fine."""
        with service_context(self.settings_obj, actor="operator", plugins=self.plugins_obj) as ctx:
            try:
                return action(ctx, *args, **kwargs)
            except QrmError:
                return None

    def _partitions(self, state: str | None = None) -> list[Partition]:
        """Every partition; those in ``state`` if there are any (so that rules mostly act on something)."""
        with service_context(self.settings_obj, plugins=self.plugins_obj) as ctx:
            rows = list(ctx.session.exec(select(Partition).order_by(Partition.id)).all())
            ctx.session.commit()
        return [p for p in rows if p.state == state] or rows

    @rule(host=st.sampled_from(HOST_MACS), count=st.integers(1, 2), memory=st.sampled_from([512, 1024]))
    def add_partitions(self, host: str, count: int, memory: int) -> None:
        made = self._service(parts.add_partitions, host=host, count=count, cpus=1, memory_mb=memory)
        for p in made or []:
            self.partition_hosts[p.mac] = host
            self.site.add_node(p.mac, cpus=1, memory_mb=memory)  # the VM boots from the network
        self.quiet_steps = 0

    @precondition(lambda self: self.partition_hosts)
    @rule(data=st.data(), force=st.booleans())
    def pause_partition(self, data, force: bool) -> None:
        partition = data.draw(st.sampled_from(self._partitions("running")))
        if self._service(parts.pause_partition, partition.name, force=force) is not None:
            self.site.nodes[partition.mac].alive = False  # a paused VM says nothing
        self.quiet_steps = 0

    @precondition(lambda self: self.partition_hosts)
    @rule(data=st.data())
    def resume_partition(self, data) -> None:
        partition = data.draw(st.sampled_from(self._partitions("paused")))
        if self._service(parts.resume_partition, partition.name, now=self.site.clock()) is not None:
            self.site.nodes[partition.mac].alive = True
        self.quiet_steps = 0

    @precondition(lambda self: self.partition_hosts)
    @rule(data=st.data(), to=st.sampled_from(HOST_MACS), offline=st.booleans())
    def migrate_partition(self, data, to: str, offline: bool) -> None:
        partition = data.draw(st.sampled_from(self._partitions("running")))
        moved = self._service(
            parts.migrate_partition, partition.name, to, offline=offline, now=self.site.clock()
        )
        if moved is not None:
            self.partition_hosts[partition.mac] = to
            node = self.site.nodes[partition.mac]
            if offline and moved.state == "running":
                node.alive, node.token = True, None  # stopped, moved, started: it boots again
        self.quiet_steps = 0

    @precondition(lambda self: self.partition_hosts)
    @rule(data=st.data())
    def remove_partition(self, data) -> None:
        partition = data.draw(st.sampled_from(self._partitions()))
        if self._service(parts.remove_partition, partition.name) is not None:
            self.partition_hosts.pop(partition.mac)
            self.site.nodes.pop(partition.mac)  # the VM is no more
        self.quiet_steps = 0

    @rule(host=st.sampled_from(HOST_MACS))
    def host_fails(self, host: str) -> None:
        """A hypervisor host dies, and every partition on it with it."""
        self.hypervisor.dead.add(host)
        self.site.nodes[host].alive = False
        for vm, where in self.partition_hosts.items():
            if where == host:
                self.site.nodes[vm].alive = False
        self.quiet_steps = 0

    @rule(host=st.sampled_from(HOST_MACS))
    def host_comes_back(self, host: str) -> None:
        """The host boots again; the partitions its hypervisor runs start with it."""
        if host not in self.hypervisor.dead:
            return
        self.hypervisor.dead.discard(host)
        node = self.site.nodes[host]
        node.alive, node.token = True, None
        state = self.hypervisor.list_partitions(HostTarget(0, host, None, None, 4, 4096))
        for info in state:
            if info.state == "running" and info.mac in self.site.nodes:
                vm = self.site.nodes[info.mac]
                vm.alive, vm.token = True, None
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

    @invariant()
    def no_partition_on_two_hosts_and_none_lost(self) -> None:
        """What qrm records of partitions is what the hypervisor has: each
        partition on exactly one host (its recorded one), none the hypervisor
        has that qrm does not know, a resource of a partition on its host."""
        if not hasattr(self, "site"):
            return
        rows = self._partitions()
        resources, _ = self._snapshot()
        by_id = {r.id: r for r in resources}
        hosts = {r.id: r.mac for r in resources if r.mac in HOST_MACS}
        on_hypervisor: dict[str, list[str]] = {}
        for mac in HOST_MACS:
            for info in FakeHypervisor.list_partitions(
                self.hypervisor, HostTarget(0, mac, None, None, 4, 4096)
            ):
                on_hypervisor.setdefault(info.name, []).append(mac)
        for name, where in on_hypervisor.items():
            assert len(where) == 1, f"partition {name} is on {where}"
        assert set(on_hypervisor) <= {p.name for p in rows}, "the hypervisor has a partition qrm lost"
        for p in rows:
            if p.state not in ("creating", "error"):
                assert on_hypervisor.get(p.name) == [hosts[p.host_id]], f"{p.name} recorded on the wrong host"
            if p.resource_id is not None:
                resource = by_id[p.resource_id]
                assert resource.host_id == p.host_id, f"{p.name}'s resource is on another host"
                if resource.state == "paused":
                    assert p.state == "paused", f"{p.name}'s resource is paused, the partition {p.state}"
        for r in resources:
            assert r.state != "paused" or any(p.resource_id == r.id for p in rows), (
                f"{r.mac} paused, no partition"
            )

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
                # Silent: failed, never seen, or a paused partition (silent on purpose: not failed,
                # kept by its VE), or a partition qrm stopped (off).
                assert r.state in ("error", "new", "paused", "off"), f"dead {r.mac} is {r.state}"
                if r.ve_id is not None and r.state == "error":
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
    EngineMachine.hypervisor = MortalHypervisor(qrm_settings)
    qrm_plugins.add_driver(HYPERVISOR_GROUP, EngineMachine.hypervisor)
    test = EngineMachine.TestCase
    test.settings = settings(
        max_examples=40,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    test().runTest()
