"""The qemu driver against real QEMU (TCG) through two private libvirt daemons in a
network namespace (conftest.Hosts): core's conformance kit with real live migration
between the two, and what a user sees in libvirt's own view (virsh) after qrm's
changes; bad input. Guests network-boot on the namespace's bridge (no DHCP answers
there: they sit in iPXE, which is all these tests need)."""

from __future__ import annotations

import subprocess
import time

import pytest

from qrm_core.conformance import HypervisorContract
from qrm_core.plugin_api import HostTarget, InvalidInput, NotFound, PartitionSpec
from qrm_libvirt.errors import HostUnreachable, LimitExceeded
from qrm_qemu.driver import QemuHypervisor

pytestmark = [pytest.mark.slow, pytest.mark.netns]


def virsh(hosts, index: int, *args: str) -> str:
    done = subprocess.run(
        ["virsh", "-c", hosts.daemons[index].uri, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def fields(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            found[key.strip()] = value.strip()
    return found


class TestQemuOnRealQemu(HypervisorContract):
    """Core's conformance kit against QEMU; test_migration is a real live migration."""

    @pytest.fixture
    def driver(self, libvirt, settings) -> QemuHypervisor:
        return QemuHypervisor(settings)

    @pytest.fixture
    def host(self, hosts) -> HostTarget:
        return hosts.target(0)

    @pytest.fixture
    def other_host(self, hosts) -> HostTarget:
        return hosts.target(1)


@pytest.fixture
def driver(libvirt, settings) -> QemuHypervisor:
    return QemuHypervisor(settings)


@pytest.fixture
def running(driver, hosts):
    host = hosts.target(0)
    driver.create_partition(
        host,
        PartitionSpec("web1", cpus=1, memory_mb=128, mac="52:54:00:10:00:01", max_cpus=2, max_memory_mb=256),
    )
    driver.start_partition(host, "web1")
    yield host
    for where in (hosts.target(0), hosts.target(1)):
        try:
            driver.destroy_partition(where, "web1")
        except NotFound:
            pass


def test_the_guest_runs_on_the_bridge(driver, hosts, running) -> None:
    ports = hosts.netns.ip("-o", "link", "show", "master", "br0")
    assert "vnet" in ports
    dominfo = fields(virsh(hosts, 0, "dominfo", "web1"))
    assert dominfo["State"] == "running" and dominfo["CPU(s)"] == "1"
    xml = virsh(hosts, 0, "dumpxml", "web1")
    assert "<boot order='1'/>" in xml and "type='qemu'" in xml


def test_changes_show_in_libvirts_own_view(driver, hosts, running) -> None:
    host = running
    driver.pause_partition(host, "web1")
    assert virsh(hosts, 0, "domstate", "web1").strip() == "paused"
    assert driver.get_partition(host, "web1").state == "paused"
    driver.unpause_partition(host, "web1")
    assert virsh(hosts, 0, "domstate", "web1").strip() == "running"
    driver.set_vcpus(host, "web1", 2)
    assert virsh(hosts, 0, "vcpucount", "web1", "--live", "--active").strip() == "2"
    assert virsh(hosts, 0, "vcpucount", "web1", "--config", "--active").strip() == "2"
    driver.pin_vcpus(host, "web1", {0: (1,), 1: (0, 1)})
    pins = virsh(hosts, 0, "vcpupin", "web1", "--live")
    assert [line.split() for line in pins.splitlines() if line.strip().startswith(("0", "1"))] == [
        ["0", "1"],
        ["1", "0-1"],
    ]
    assert "cpuset='1'" in virsh(hosts, 0, "dumpxml", "web1", "--inactive")
    driver.set_memory(host, "web1", 200)
    # The persistent size is libvirt's; the live balloon needs a guest driver (these guests
    # sit in iPXE), so qrm reports the target it set.
    assert fields(virsh(hosts, 0, "dominfo", "web1"))["Max memory"] == "262144 KiB"
    assert "<currentMemory unit='KiB'>204800</currentMemory>" in virsh(
        hosts, 0, "dumpxml", "web1", "--inactive"
    )
    info = driver.get_partition(host, "web1")
    assert (info.memory_mb, info.cpus, info.cpu_pinning) == (200, 2, {0: (1,), 1: (0, 1)})


def test_stop_asks_then_pulls(driver, hosts, running) -> None:
    """iPXE ignores ACPI: after the shutdown timeout (2 s here) the plug is pulled."""
    started = time.monotonic()
    driver.stop_partition(running, "web1")
    took = time.monotonic() - started
    assert driver.get_partition(running, "web1").state == "stopped"
    assert 2 <= took < 10


def test_bad_input_is_one_line_and_changes_nothing(driver, hosts, running, tmp_path) -> None:
    host = running
    with pytest.raises(LimitExceeded) as info:
        driver.set_memory(host, "web1", 512)
    assert info.value.message == (
        "memory 512 MB is above the maximum of partition web1 (256 MB, set when it was created)"
    )
    with pytest.raises(InvalidInput) as info:
        driver.pin_vcpus(host, "web1", {0: (99,)})
    assert info.value.message.startswith("host hv1 has no CPU 99 (it has ")
    assert driver.get_partition(host, "web1").cpu_pinning in ({}, {0: tuple(range(host.cpus))})
    xen = HostTarget(**{**hosts.target(1).__dict__, "uri": "xen+ssh://root@10.88.0.9/system"})
    with pytest.raises(InvalidInput) as info:
        driver.migrate_partition(host, "web1", xen)
    assert "is not a qemu URI" in info.value.message
    gone = HostTarget(**{**host.__dict__, "uri": f"qemu+unix:///system?socket={tmp_path}/gone/libvirt-sock"})
    with pytest.raises(HostUnreachable) as info:
        driver.list_partitions(gone)
    assert info.value.message.startswith("cannot reach host hv1 (qemu+unix:///system?socket=")
    # The domain undefined behind qrm's back: libvirt's error, as one line.
    virsh(hosts, 0, "destroy", "web1")
    virsh(hosts, 0, "undefine", "web1")
    with pytest.raises(NotFound) as info:
        driver.pause_partition(host, "web1")
    assert info.value.message == "partition 'web1' does not exist on host hv1"
