"""The lifecycle watcher: partitions changed behind qrm's back are observed from
libvirt's events within a second; hosts that cannot be reached are reported once;
a reconnection reconciles. On libvirt's test driver (the real-QEMU migration case is
in qrm_qemu's tests)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from qrm_core.plugin_api import HostTarget, PartitionSpec, Settings
from qrm_libvirt.connections import ConnectionPool
from qrm_libvirt.domxml import DomainDefinition, Nic
from qrm_libvirt.driver import LibvirtHypervisor
from qrm_libvirt.testing import test_host, wait_until
from qrm_libvirt.watcher import LifecycleWatcher, Observation


class PlainHypervisor(LibvirtHypervisor):
    """The smallest flavour: what the watcher needs of a driver (tests only)."""

    name = "plain"
    description = "a libvirt flavour for qrm-libvirt's own tests"
    family = "qemu"
    default_uri = "qemu+ssh://root@{address}/system"

    def definition(self, host, conn, spec) -> DomainDefinition:
        return DomainDefinition(
            name=spec.name,
            domain_type="kvm",
            memory_kib=spec.memory_mb * 1024,
            max_memory_kib=spec.memory_mb * 1024,
            vcpus=spec.cpus,
            max_vcpus=spec.cpus,
            nic=Nic(mac=self.mac(spec), bridge="br0"),
        )


class Seen:
    def __init__(self) -> None:
        self.items: list[Observation] = []
        self.lock = threading.Lock()

    def __call__(self, observation: Observation) -> None:
        with self.lock:
            self.items.append(observation)

    def states(self, name: str | None) -> list[str]:
        with self.lock:
            return [o.state for o in self.items if o.name == name]


@pytest.fixture
def parts(libvirt, tmp_path: Path):
    pool = ConnectionPool()
    driver = PlainHypervisor(Settings(data_dir=tmp_path / "data"))
    driver.pool = lambda: pool  # type: ignore[method-assign]
    host = test_host(tmp_path / "hosts", "hv1")
    hosts: list[HostTarget] = [host]
    seen = Seen()
    watcher = LifecycleWatcher(driver, lambda: list(hosts), seen, pool=pool, refresh=0.2)
    yield driver, host, hosts, seen, watcher, pool
    watcher.stop()
    pool.close_all()


def test_changes_behind_qrms_back_are_seen_at_once(parts) -> None:
    driver, host, _hosts, seen, watcher, pool = parts
    driver.create_partition(host, PartitionSpec("p1", cpus=1, memory_mb=64))
    driver.start_partition(host, "p1")
    watcher.start()
    wait_until(lambda: seen.states("p1") == ["running"], 5, "the sweep on connecting")
    assert seen.items[0].reason == "found on connecting"
    dom = pool.get(host.uri, "hv1").lookupByName("p1")  # someone else, on the host itself
    dom.suspend()
    wait_until(lambda: seen.states("p1")[-1:] == ["paused"], 1, "paused within a second")
    dom.resume()
    dom.destroy()
    wait_until(lambda: seen.states("p1")[-2:] == ["running", "stopped"], 1, "destroyed within a second")
    dom.undefine()
    wait_until(lambda: seen.states("p1")[-1:] == ["undefined"], 1, "undefined within a second")
    assert [o.reason for o in seen.items if o.name == "p1"][-2:] == ["destroyed", "undefined"]
    assert all(o.host == host for o in seen.items)


def test_unreachable_hosts_are_reported_once_and_new_hosts_are_picked_up(parts, tmp_path: Path) -> None:
    driver, host, hosts, seen, watcher, _pool = parts
    gone = HostTarget(
        **{
            **host.__dict__,
            "resource_id": 7,
            "hostname": "hv7",
            "uri": f"qemu+unix:///system?socket={tmp_path}/no/sock",
        }
    )
    hosts.append(gone)
    watcher.start()
    wait_until(lambda: seen.states(None) == ["unreachable"], 5, "the unreachable host reported")
    unreachable = next(o for o in seen.items if o.name is None)
    assert unreachable.host == gone and unreachable.reason.startswith("cannot reach host hv7 (")
    later = test_host(tmp_path / "hosts", "hv3", resource_id=3)
    hosts.append(later)
    driver.create_partition(later, PartitionSpec("p3", cpus=1, memory_mb=64))
    wait_until(
        lambda: "hv3" in {o.host.hostname for o in seen.items if o.name == "p3"}, 5, "the new host watched"
    )
    driver.start_partition(later, "p3")
    wait_until(lambda: seen.states("p3")[-1:] == ["running"], 1, "its events arrive")
    assert seen.states(None) == ["unreachable"]  # once, not every refresh
