"""The engine through the services: placement, boot generations, failover, stop."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from enginekit import Site
from sqlmodel import select

from qrm_core.models import Resource
from qrm_core.services import agent, boot_images, resources, service_context, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.services.events import list_events


@pytest.fixture
def site(qrm_ctx, qrm_settings, qrm_plugins):
    storage.add_storage(qrm_ctx, name="st", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="root", storage="st", location="/exports/root")
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")
    return Site(qrm_settings, qrm_plugins)


def _ve(settings, plugins, name):
    with service_context(settings, plugins=plugins) as ctx:
        return ves.show_ve(ctx, name)


def _res(settings, plugins, mac):
    with service_context(settings, plugins=plugins) as ctx:
        return resources.show_resource(ctx, mac)


def test_a_machine_whose_agent_is_alive_keeps_its_identity(site, qrm_ctx) -> None:
    """Issue 15: the enrollment token (in every boot script) used to take over a
    live machine at once. Now a second registration of its MAC is refused and
    recorded with the address it came from, unless it is the agent itself
    (its token as proof), qrm ordered the reboot (boot generation), or the
    agent went quiet past its heartbeat interval (a power cut)."""
    node = site.add_node("52:54:00:15:00:02")
    site.step()
    interval = site.settings.heartbeat_interval

    def register(**kwargs):
        kwargs.setdefault("boot_generation", node.generation)
        with service_context(site.settings, actor="agent", plugins=site.plugins) as ctx:
            return agent.register(
                ctx, mac=node.mac, ip="198.18.9.9", cpus=1, memory_mb=64, now=site.clock(), **kwargs
            )

    with pytest.raises(agent.RegistrationRefused, match="its agent is alive"):
        register(source="198.18.9.9")
    with service_context(site.settings, plugins=site.plugins) as ctx:
        events = [e.message for e in list_events(ctx, object_name=node.mac)]
    assert f"registration of {node.mac} from 198.18.9.9 refused: its agent is alive (heard 0 s ago)" in events
    assert node.beat(site.settings, site.plugins, site.clock) == "none"  # its token still works
    assert _res(site.settings, site.plugins, node.mac).cpus == 2  # nothing of the stranger's kept

    # The agent itself registers again (what it reports changed): its token is the proof.
    reg = register(proof=node.token)
    node.token = reg.token
    assert node.beat(site.settings, site.plugins, site.clock) == "none"

    # qrm orders a reboot: the boot it ordered registers although the agent was just heard...
    with service_context(site.settings, plugins=site.plugins) as ctx:
        agent.order_reboot(ctx, node.mac)
    assert node.beat(site.settings, site.plugins, site.clock) == "reboot"  # and it booted again
    assert node.beat(site.settings, site.plugins, site.clock) == "none"
    # ... once: that generation is registered now.
    with pytest.raises(agent.RegistrationRefused):
        register()

    # A power cut: the same machine boots again before qrm noticed, and is let in
    # once its agent has been quiet past the heartbeat interval.
    site.clock.advance(interval * 0.5)
    with pytest.raises(agent.RegistrationRefused):
        node.boot(site.settings, site.plugins, site.clock)
    site.clock.advance(interval * 1.1)
    node.boot(site.settings, site.plugins, site.clock)
    assert node.beat(site.settings, site.plugins, site.clock) == "none"


def test_single_ve_starts_runs_and_stops(site, qrm_ctx) -> None:
    a = site.add_node("52:54:00:00:00:0a", cpus=4, memory_mb=4096)
    site.add_node("52:54:00:00:00:0b", cpus=1, memory_mb=512)
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root", cpus=2)
    ves.start_ve(qrm_ctx, "web")
    site.reconciler.tick()
    assert _res(site.settings, site.plugins, a.mac).state == "assigned"
    site.settle(3)
    web = _ve(site.settings, site.plugins, "web")
    assert web.state == "running" and web.resources == [a.mac]
    assert a.mode == "ve" and a.ve == "web"
    assert _res(site.settings, site.plugins, a.mac).state == "active"

    fake = site.plugins.storage_driver("fake")
    target = storage.target(storage.get_storage_row(qrm_ctx, "st"))
    assert [(v.location, v.exported_to) for v in fake.list_volumes(target)] == [("/exports/root", (a.ip,))]

    ves.stop_ve(qrm_ctx, "web")
    assert _ve(site.settings, site.plugins, "web").state == "stopping"
    site.settle(3)
    web = _ve(site.settings, site.plugins, "web")
    assert web.state == "stopped" and web.resources == []
    assert a.mode == "idle"
    assert _res(site.settings, site.plugins, a.mac).state == "idle"
    assert [v.exported_to for v in fake.list_volumes(target)] == [()]


def test_old_os_heartbeats_do_not_flip_the_resource_back(site, qrm_ctx) -> None:
    node = site.add_node("52:54:00:00:00:0c")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    site.reconciler.tick()
    row = _res(site.settings, site.plugins, node.mac)
    assert row.state == "assigned" and row.boot_generation == 1
    # The old idle OS keeps heartbeating (generation 0) several times before it reboots.
    for _ in range(5):
        with service_context(site.settings, plugins=site.plugins) as ctx:
            answer = agent.heartbeat(
                ctx,
                resource_id=node.resource_id,
                token=node.token,
                state="idle",
                boot_generation=0,
                now=site.clock(),
            )
        assert answer.command == "reboot"
        assert _res(site.settings, site.plugins, node.mac).state == "assigned"


def test_failover_moves_the_ve_and_the_failed_node_never_serves_it_again(site, qrm_ctx) -> None:
    a = site.add_node("52:54:00:00:00:01")
    b = site.add_node("52:54:00:00:00:02")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root", failover=True)
    ves.start_ve(qrm_ctx, "web")
    site.settle(3)
    first = _ve(site.settings, site.plugins, "web").resources[0]
    victim, other = (a, b) if first == a.mac else (b, a)
    victim.alive = False
    site.settle(int(site.settings.heartbeat_timeout) + 5, 1.0)
    web = _ve(site.settings, site.plugins, "web")
    assert web.state == "running" and web.resources == [other.mac]
    assert _res(site.settings, site.plugins, victim.mac).state == "error"
    # The victim comes back (it was only cut off): it is rebooted to idle, not into web.
    victim.alive = True
    site.settle(3)
    assert _res(site.settings, site.plugins, victim.mac).state == "idle"
    assert victim.mode == "idle"
    assert _ve(site.settings, site.plugins, "web").resources == [other.mac]


def test_without_failover_the_ve_degrades_and_resumes(site, qrm_ctx) -> None:
    a = site.add_node("52:54:00:00:00:01")
    site.add_node("52:54:00:00:00:02")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    site.settle(3)
    member = site.nodes[_ve(site.settings, site.plugins, "web").resources[0]]
    member.alive = False
    site.settle(int(site.settings.heartbeat_timeout) + 5)
    web = _ve(site.settings, site.plugins, "web")
    assert web.state == "degraded" and "failover is off" in web.problem
    assert web.resources == [member.mac]
    member.alive = True
    site.settle(2)
    web = _ve(site.settings, site.plugins, "web")
    assert web.state == "running" and web.resources == [member.mac]
    del a


def test_shared_pool_degrades_refills_and_explains(site, qrm_ctx) -> None:
    site.add_node("52:54:00:00:00:01")
    ves.create_ve(
        qrm_ctx,
        name="pool",
        boot_image="idle",
        fs_image="root",
        deployment="shared",
        pool_size=2,
        memory_mb=1024,
        failover=True,
    )
    ves.start_ve(qrm_ctx, "pool")
    site.settle(3)
    pool = _ve(site.settings, site.plugins, "pool")
    assert pool.state == "starting" and len(pool.resources) == 1
    assert pool.problem == "needs 1 more resource (at least 1024 MB): no idle resource is left"
    site.add_node("52:54:00:00:00:02", memory_mb=512)
    site.settle(1)
    assert "1 have less than 1024 MB" in _ve(site.settings, site.plugins, "pool").problem
    site.add_node("52:54:00:00:00:03", memory_mb=4096)
    site.settle(3)
    pool = _ve(site.settings, site.plugins, "pool")
    assert pool.state == "running" and len(pool.resources) == 2 and pool.problem == ""
    ves.resize_ve(qrm_ctx, "pool", 1)
    site.settle(3)
    assert len(_ve(site.settings, site.plugins, "pool").resources) == 1


def test_partitioned_ve_creates_a_vm_on_a_host(site, qrm_ctx) -> None:
    host = site.add_node("52:54:00:00:01:01", cpus=8, memory_mb=8192, hypervisors=["fake"])
    ves.create_ve(
        qrm_ctx,
        name="vmve",
        boot_image="idle",
        fs_image="root",
        deployment="partitioned",
        hypervisor="fake",
        cpus=2,
        memory_mb=1024,
    )
    ves.start_ve(qrm_ctx, "vmve")
    site.reconciler.tick()
    driver = site.plugins.hypervisor_driver("fake")
    from qrm_core.services.partitions import host_target

    with service_context(site.settings, plugins=site.plugins) as ctx:
        host_row = ctx.session.exec(select(Resource).where(Resource.mac == host.mac)).one()
        parts = driver.list_partitions(host_target(host_row))
    assert [(p.name, p.state, p.cpus, p.memory_mb) for p in parts] == [("vmve-1", "running", 2, 1024)]
    assert "creating partition vmve-1" in _ve(site.settings, site.plugins, "vmve").problem
    site.reconciler.tick()
    assert "waiting for partition vmve-1" in _ve(site.settings, site.plugins, "vmve").problem
    # The partition network-boots: its agent registers with the partition's MAC.
    vm = site.add_node(parts[0].mac, cpus=2, memory_mb=1024)
    site.settle(3)
    vm_row = _res(site.settings, site.plugins, vm.mac)
    assert vm_row.kind == "virtual" and vm_row.host == host.mac and vm_row.hypervisor == "fake"
    vmve = _ve(site.settings, site.plugins, "vmve")
    assert vmve.state == "running" and vmve.resources == [vm.mac] and vmve.problem == ""

    from qrm_core.errors import InUse
    from qrm_core.services import partitions

    with pytest.raises(InUse, match="serves a virtual environment"):
        partitions.remove_partition(qrm_ctx, "vmve-1")
    ves.stop_ve(qrm_ctx, "vmve")
    site.settle(3)
    removed = partitions.remove_partition(qrm_ctx, "vmve-1")
    assert removed.host == host.mac
    del site.nodes[vm.mac]
    with service_context(site.settings, plugins=site.plugins) as ctx:
        assert (
            driver.list_partitions(
                host_target(ctx.session.exec(select(Resource).where(Resource.mac == host.mac)).one())
            )
            == []
        )
        assert ctx.session.exec(select(Resource).where(Resource.mac == vm.mac)).first() is None


def test_partition_without_room_explains(site, qrm_ctx) -> None:
    site.add_node("52:54:00:00:01:01", cpus=1, memory_mb=512, hypervisors=["fake"])
    ves.create_ve(
        qrm_ctx,
        name="big",
        boot_image="idle",
        fs_image="root",
        deployment="partitioned",
        hypervisor="fake",
        memory_mb=4096,
    )
    ves.start_ve(qrm_ctx, "big")
    site.reconciler.tick()
    assert "no host of hypervisor fake has room" in _ve(site.settings, site.plugins, "big").problem


def test_shared_pool_of_vms_is_spread_across_hosts(site, qrm_ctx) -> None:
    from qrm_core.services import resources as res

    hosts = [
        site.add_node(f"52:54:00:00:02:0{i}", cpus=8, memory_mb=8192, hypervisors=["fake"]) for i in (1, 2)
    ]
    host_ids = [res.show_resource(qrm_ctx, h.mac).id for h in hosts]
    # Two idle VMs on the first host, one on the second, sized alike.
    for i, host in enumerate([host_ids[0], host_ids[0], host_ids[1]]):
        res.add_resource(
            qrm_ctx, mac=f"52:54:00:00:03:0{i}", kind="virtual", host=str(host), hypervisor="fake"
        )
        site.add_node(f"52:54:00:00:03:0{i}", cpus=2, memory_mb=1024)
    ves.create_ve(
        qrm_ctx,
        name="pool",
        boot_image="idle",
        fs_image="root",
        deployment="shared",
        pool_size=2,
        hypervisor="fake",
    )
    ves.start_ve(qrm_ctx, "pool")
    site.settle(3)
    members = [res.show_resource(qrm_ctx, mac) for mac in _ve(site.settings, site.plugins, "pool").resources]
    assert len(members) == 2 and {m.host for m in members} == {hosts[0].mac, hosts[1].mac}


def test_a_failed_vm_is_fenced_and_replaced(site, qrm_ctx) -> None:
    from qrm_core.services.partitions import host_target

    host = site.add_node("52:54:00:00:01:01", cpus=8, memory_mb=8192, hypervisors=["fake"])
    ves.create_ve(
        qrm_ctx,
        name="vmve",
        boot_image="idle",
        fs_image="root",
        deployment="partitioned",
        hypervisor="fake",
        memory_mb=512,
        failover=True,
    )
    ves.start_ve(qrm_ctx, "vmve")
    driver = site.plugins.hypervisor_driver("fake")

    def partitions():
        with service_context(site.settings, plugins=site.plugins) as ctx:
            row = ctx.session.exec(select(Resource).where(Resource.mac == host.mac)).one()
            return {p.name: p for p in driver.list_partitions(host_target(row))}

    def boot_running_vms():
        for p in partitions().values():
            if p.state == "running" and p.mac not in site.nodes:
                site.add_node(p.mac, cpus=p.cpus, memory_mb=p.memory_mb)

    for _ in range(4):
        site.step()
        boot_running_vms()
    first = _ve(site.settings, site.plugins, "vmve")
    assert first.state == "running"
    vm = site.nodes[first.resources[0]]
    vm.alive = False  # the VM hangs: no more heartbeats
    for _ in range(int(site.settings.heartbeat_timeout) + 10):
        site.step()
        boot_running_vms()
    after = _ve(site.settings, site.plugins, "vmve")
    assert after.state == "running" and after.resources != first.resources
    states = {name: p.state for name, p in partitions().items()}
    assert states == {"vmve-1": "stopped", "vmve-2": "running"}  # fenced, and a new one serves
    events = [e.message for e in list_events(qrm_ctx, limit=200)]
    assert any("partition vmve-1 fenced" in m for m in events)


def test_an_agent_reporting_failure_fails_over_at_once(site, qrm_ctx) -> None:
    site.add_node("52:54:00:00:00:01")
    site.add_node("52:54:00:00:00:02")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root", failover=True)
    ves.start_ve(qrm_ctx, "web")
    site.settle(3)
    first = site.nodes[_ve(site.settings, site.plugins, "web").resources[0]]
    with service_context(site.settings, plugins=site.plugins) as ctx:
        answer = agent.heartbeat(
            ctx,
            resource_id=first.resource_id,
            token=first.token,
            state="failed",
            reason="cannot fetch the root filesystem\nHTTP 404",
            boot_generation=first.generation,
            now=site.clock(),
        )
    assert answer.command == "none"
    row = _res(site.settings, site.plugins, first.mac)
    assert row.state == "error"
    site.reconciler.tick()  # the engine's next pass, before any timeout: fenced and released
    assert _res(site.settings, site.plugins, first.mac).ve is None
    site.settle(3)
    web = _ve(site.settings, site.plugins, "web")
    assert web.state == "running" and web.resources != [first.mac]
    events = [e.message for e in list_events(qrm_ctx, limit=50)]
    assert any("its agent reports failure: cannot fetch the root filesystem HTTP 404" in m for m in events)


def test_a_rebooting_machine_gets_the_boot_timeout(site, qrm_ctx) -> None:
    """Silent while it reboots at qrm's order: not failed after the heartbeat
    timeout, only after the (longer) boot timeout."""
    node = site.add_node("52:54:00:00:00:01")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    site.reconciler.tick()
    assert _res(site.settings, site.plugins, node.mac).state == "assigned"
    node.alive = False  # powered down by the reboot, taking its time
    site.settle(int(site.settings.heartbeat_timeout) + 5)
    assert _res(site.settings, site.plugins, node.mac).state == "assigned"
    site.settle(int(site.settings.boot_timeout - site.settings.heartbeat_timeout) + 5)
    row = _res(site.settings, site.plugins, node.mac)
    assert row.state == "error"
    events = [e.message for e in list_events(qrm_ctx, limit=50)]
    assert any("did not come back from the reboot" in m for m in events)


def test_a_machine_booting_its_ve_gets_the_boot_timeout(site, qrm_ctx) -> None:
    """Registered from its initrd (``booting``), a machine mounts its VE's root (an iSCSI
    login, an NFS mount) before it registers again from that root: silent meanwhile, it
    gets the boot timeout, not the heartbeat timeout; past it, it has failed."""
    node = site.add_node("52:54:00:00:00:01")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    site.reconciler.tick()
    site.step()  # its heartbeat gets the reboot order: it boots the VE and registers from its initrd
    assert _res(site.settings, site.plugins, node.mac).state == "booting"
    node.alive = False  # mounting its root
    site.settle(int(site.settings.heartbeat_timeout) + 5)
    assert _res(site.settings, site.plugins, node.mac).state == "booting"
    site.settle(int(site.settings.boot_timeout - site.settings.heartbeat_timeout) + 5)
    assert _res(site.settings, site.plugins, node.mac).state == "error"
    events = [e.message for e in list_events(qrm_ctx, limit=50)]
    assert any("did not finish booting its virtual environment" in m for m in events)


@contextmanager
def _export_held(site, monkeypatch) -> Iterator[None]:
    """A reconcile pass in a thread of its own, held inside its first storage
    export (the fake driver's real call, only its timing controlled) until
    the block ends, so the engine's transaction scope can be observed."""
    from qrm_core.drivers.fake import FakeStorage

    entered, release = threading.Event(), threading.Event()
    real = FakeStorage.export_volume

    def export_volume(self, storage_target, location, client):
        entered.set()
        assert release.wait(30), "the test never let the export finish"
        return real(self, storage_target, location, client)

    monkeypatch.setattr(FakeStorage, "export_volume", export_volume)
    tick = threading.Thread(target=site.reconciler.tick)
    tick.start()
    try:
        assert entered.wait(30), "the engine did not export"
        yield
    finally:
        release.set()
        tick.join(60)


def _exported_to(site, qrm_ctx) -> list[tuple[str, ...]]:
    fake = site.plugins.storage_driver("fake")
    target = storage.target(storage.get_storage_row(qrm_ctx, "st"))
    return [v.exported_to for v in fake.list_volumes(target)]


def test_storage_driver_calls_hold_no_database_lock(site, qrm_ctx, monkeypatch) -> None:
    """While the engine waits for a storage driver (a slow NFS server), machines
    still register and heartbeat: on SQLite an open write transaction would
    stop them."""
    a = site.add_node("52:54:00:00:00:1a")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    with _export_held(site, monkeypatch):
        started = time.monotonic()
        b = site.add_node("52:54:00:00:00:1b")  # a registration: a write
        assert b.beat(site.settings, site.plugins, site.clock) == "none"  # a heartbeat
        took = time.monotonic() - started
    assert took < 5, f"a registration waited {took:.1f} s for the engine's export"
    assert _exported_to(site, qrm_ctx) == [(a.ip,)]


def test_an_export_made_for_a_resource_that_left_meanwhile_is_withdrawn(site, qrm_ctx, monkeypatch) -> None:
    a = site.add_node("52:54:00:00:00:2a")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    with _export_held(site, monkeypatch):
        # The VE is stopped and the machine boots idle while the export is made.
        with service_context(site.settings, plugins=site.plugins) as ctx:
            ves.stop_ve(ctx, "web")
        a.boot(site.settings, site.plugins, site.clock)
        assert a.mode == "idle"
    assert _res(site.settings, site.plugins, a.mac).state == "idle"
    assert _exported_to(site, qrm_ctx) == [()]


def _host_and_partition(site, qrm_ctx):
    from qrm_core.services import partitions as parts

    host = site.add_node("52:54:00:00:05:01", cpus=8, memory_mb=8192, hypervisors=["fake"])
    [made] = parts.add_partitions(qrm_ctx, host=host.mac, count=1, cpus=1, memory_mb=256, prefix="vm")
    return host, made


def _partition_state(site, name: str) -> str:
    from qrm_core.services import partitions as parts

    with service_context(site.settings, plugins=site.plugins) as ctx:
        return parts.show_partition(ctx, name).state


def test_the_engine_records_what_a_hypervisor_did_behind_qrm_s_back(site, qrm_ctx) -> None:
    """Paused, then destroyed on the hypervisor, not through qrm: the periodic
    partition sync records both, once each, at its interval."""
    from qrm_core.services.partitions import host_target

    host, made = _host_and_partition(site, qrm_ctx)
    driver = site.plugins.hypervisor_driver("fake")
    with service_context(site.settings, plugins=site.plugins) as ctx:
        target = host_target(ctx.session.exec(select(Resource).where(Resource.mac == host.mac)).one())
    site.step()  # the first pass syncs at once
    assert _partition_state(site, made.name) == "running"
    driver.pause_partition(target, made.name)
    site.step(site.settings.partition_sync_interval / 2)
    assert _partition_state(site, made.name) == "running"  # not due yet
    site.step(site.settings.partition_sync_interval / 2)
    assert _partition_state(site, made.name) == "paused"
    driver.destroy_partition(target, made.name)
    site.step(site.settings.partition_sync_interval)
    assert _partition_state(site, made.name) == "error"
    with service_context(site.settings, plugins=site.plugins) as ctx:
        messages = [e.message for e in list_events(ctx, limit=100) if e.object_name == made.name]
    assert sum("running -> paused" in m for m in messages) == 1, messages
    assert sum("gone from" in m for m in messages) == 1, messages


def test_an_unreachable_host_is_reported_once_and_its_recovery_too(site, qrm_ctx, monkeypatch) -> None:
    from qrm_core.drivers.fake import FakeHypervisor
    from qrm_core.errors import DriverError

    _host_and_partition(site, qrm_ctx)
    real = FakeHypervisor.list_partitions

    def unreachable(self, host):
        raise DriverError("cannot reach hv: connection refused")

    monkeypatch.setattr(FakeHypervisor, "list_partitions", unreachable)
    for _ in range(3):
        site.step(site.settings.partition_sync_interval)
    monkeypatch.setattr(FakeHypervisor, "list_partitions", real)
    site.step(site.settings.partition_sync_interval)
    with service_context(site.settings, plugins=site.plugins) as ctx:
        messages = [e.message for e in list_events(ctx, limit=100)]
    assert sum("cannot reconcile the partitions" in m and "connection refused" in m for m in messages) == 1
    assert sum("can be reconciled again" in m for m in messages) == 1


def test_partition_sync_runs_at_its_interval_and_can_be_turned_off() -> None:
    from datetime import timedelta

    from enginekit import Clock

    from qrm_core.engine.sync import PartitionSync

    step, now = PartitionSync(), Clock()()
    assert step.due(now, 60) and not step.due(now, 0)
    step.last_run = now
    assert not step.due(now + timedelta(seconds=59), 60)
    assert step.due(now + timedelta(seconds=60), 60)
