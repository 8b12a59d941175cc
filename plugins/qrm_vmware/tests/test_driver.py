"""The ``vmware`` hypervisor driver against a real vSphere API (vcsim).

Every operation is checked in vCenter's own view, through a separate
pyVmomi session (``view``), not through what the driver reports.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from qrm_core.drivers.base import HostTarget, PartitionSpec
from qrm_core.errors import DriverError, InvalidInput, NotFound, QrmError
from qrm_core.services import service_context
from qrm_core.services.partitions import host_target
from qrm_vmware import refs

# The driver keeps nothing in qrm's database but the connection: one backend is enough.
pytestmark = pytest.mark.qrm_backends("sqlite")


@pytest.fixture
def env(qrm_cli, qrm_settings, qrm_plugins, vcsim) -> Iterator[dict]:
    """vCenter vc1 connected and synced; the driver, host targets by hostname, and a separate view of vCenter."""
    from sqlmodel import select

    from qrm_core.models import Resource

    assert (
        qrm_cli(
            "vmware",
            "connect",
            "-n",
            "vc1",
            "--url",
            vcsim.url,
            "-u",
            vcsim.username,
            "-p",
            vcsim.password,
            "--insecure",
        ).exit_code
        == 0
    )
    assert qrm_cli("vmware", "sync", "vc1").exit_code == 0
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        hosts = {r.hostname: host_target(r) for r in ctx.session.exec(select(Resource)).all()}
    si = vcsim.connect()
    driver = qrm_plugins.hypervisor_driver("vmware")
    made: list[tuple[HostTarget, str]] = []
    yield {"driver": driver, "hosts": hosts, "si": si, "made": made, "sim": vcsim}
    for host, name in made:  # the module's simulator is shared: leave it as found
        try:
            driver.destroy_partition(host, name)
        except QrmError:
            pass


def vm_in_vcenter(si, mac: str):
    """The VM with qrm's marker for ``mac``, as vCenter has it (None if none)."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        for vm in view.view:
            marker = refs.parse_marker(vm.config.annotation)
            if marker is not None and marker.mac == mac:
                return vm
    finally:
        view.Destroy()
    return None


def make(env, host: str, name: str, mac: str, cpus: int = 1, memory: int = 512):
    target = env["hosts"][host]
    info = env["driver"].create_partition(
        target, PartitionSpec(name=name, cpus=cpus, memory_mb=memory, mac=mac)
    )
    env["made"].append((target, name))
    return target, info


def test_create_makes_a_network_booting_vm(env) -> None:
    host, info = make(env, "DC0-C0-H0", "web-1", "52:54:00:10:00:01", cpus=2, memory=1024)
    assert (info.name, info.state, info.cpus, info.memory_mb, info.mac) == (
        "web-1",
        "stopped",
        2,
        1024,
        "52:54:00:10:00:01",
    )
    vm = vm_in_vcenter(env["si"], "52:54:00:10:00:01")
    assert vm is not None and vm.name == "web-1-100001"
    assert vm.runtime.host.name == "DC0_C0_H0" and vm.runtime.powerState == "poweredOff"
    assert (vm.config.hardware.numCPU, vm.config.hardware.memoryMB) == (2, 1024)
    assert vm.config.memoryHotAddEnabled and vm.config.cpuHotAddEnabled
    nics = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert len(nics) == 1 and isinstance(nics[0], vim.vm.device.VirtualVmxnet3)
    assert (nics[0].addressType, nics[0].macAddress) == ("manual", "52:54:00:10:00:01")
    assert nics[0].backing.deviceName == "VM Network"
    boot = vm.config.bootOptions.bootOrder
    assert isinstance(boot[0], vim.vm.BootOptions.BootableEthernetDevice) and boot[0].deviceKey == nics[0].key
    assert not [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    assert [p.name for p in env["driver"].list_partitions(host)] == ["web-1"]  # not the host's other VM
    with pytest.raises(DriverError, match="partition 'web-1' already exists on host DC0-C0-H0"):
        env["driver"].create_partition(
            host, PartitionSpec(name="web-1", cpus=1, memory_mb=512, mac="52:54:00:10:00:09")
        )


def test_power_pause_and_reboot(env) -> None:
    host, _ = make(env, "DC0-C0-H0", "pw-1", "52:54:00:10:00:02")
    driver, vm = env["driver"], vm_in_vcenter(env["si"], "52:54:00:10:00:02")
    driver.start_partition(host, "pw-1")
    assert vm.runtime.powerState == "poweredOn"
    driver.start_partition(host, "pw-1")  # running already: nothing to do
    driver.pause_partition(host, "pw-1")
    assert vm.runtime.powerState == "suspended"
    assert driver.get_partition(host, "pw-1").state == "paused"
    driver.unpause_partition(host, "pw-1")
    assert vm.runtime.powerState == "poweredOn"
    booted = vm.summary.runtime.bootTime
    assert booted is not None
    driver.reboot_partition(host, "pw-1")
    assert vm.runtime.powerState == "poweredOn" and vm.summary.runtime.bootTime > booted
    driver.stop_partition(host, "pw-1", force=True)
    assert vm.runtime.powerState == "poweredOff"
    driver.stop_partition(host, "pw-1")  # stopped already
    with pytest.raises(DriverError, match="is stopped: only a running partition can be paused"):
        driver.pause_partition(host, "pw-1")
    with pytest.raises(NotFound, match="partition 'nope' does not exist on host DC0-C0-H0"):
        driver.start_partition(host, "nope")


def test_memory_and_vcpus_live_where_vsphere_allows_it(env) -> None:
    host, _ = make(env, "DC0-C0-H0", "rs-1", "52:54:00:10:00:03", cpus=1, memory=512)
    driver, vm = env["driver"], vm_in_vcenter(env["si"], "52:54:00:10:00:03")
    driver.set_memory(host, "rs-1", 768)  # stopped: the definition changes
    assert vm.config.hardware.memoryMB == 768
    driver.start_partition(host, "rs-1")
    driver.set_memory(host, "rs-1", 1024)  # hot-add
    driver.set_vcpus(host, "rs-1", 2)
    assert (vm.config.hardware.memoryMB, vm.config.hardware.numCPU) == (1024, 2)
    with pytest.raises(DriverError, match=r"vSphere cannot take memory from a running VM.*next power-on"):
        driver.set_memory(host, "rs-1", 512)
    with pytest.raises(DriverError, match="CPU hot-remove is off for it"):
        driver.set_vcpus(host, "rs-1", 1)
    assert (vm.config.hardware.memoryMB, vm.config.hardware.numCPU) == (1024, 2)
    # Not live: kept in the VM's notes, applied at the next power-on qrm makes.
    driver.set_memory(host, "rs-1", 512, live=False)
    driver.set_vcpus(host, "rs-1", 1, live=False)
    assert (vm.config.hardware.memoryMB, vm.config.hardware.numCPU) == (1024, 2)
    assert refs.parse_marker(vm.config.annotation).pending == {"memory_mb": 512, "cpus": 1}
    driver.stop_partition(host, "rs-1", force=True)
    driver.start_partition(host, "rs-1")
    assert (vm.config.hardware.memoryMB, vm.config.hardware.numCPU) == (512, 1)
    assert refs.parse_marker(vm.config.annotation).pending == {}
    # A VM whose hot-add an administrator turned off: live growth is refused in one line.
    driver.stop_partition(host, "rs-1", force=True)
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(memoryHotAddEnabled=False)))
    driver.start_partition(host, "rs-1")
    with pytest.raises(DriverError, match="memory hot-add is off for it"):
        driver.set_memory(host, "rs-1", 2048)
    for bad, match in ((0, "multiples of 4 MB"), (1023, "multiples of 4 MB")):
        with pytest.raises(InvalidInput, match=match):
            driver.set_memory(host, "rs-1", bad)
    with pytest.raises(InvalidInput, match="1 to 768 virtual CPUs"):
        driver.set_vcpus(host, "rs-1", 0)


def test_pinning_is_cpu_affinity(env) -> None:
    host, _ = make(env, "DC0-H0", "pin-1", "52:54:00:10:00:04", cpus=2)
    driver, vm = env["driver"], vm_in_vcenter(env["si"], "52:54:00:10:00:04")
    driver.pin_vcpus(host, "pin-1", {0: (0, 1), 1: (0, 1)})
    assert list(vm.config.cpuAffinity.affinitySet) == [0, 1]
    assert driver.get_partition(host, "pin-1").cpu_pinning == {0: (0, 1), 1: (0, 1)}
    with pytest.raises(InvalidInput, match="one set of host CPUs"):
        driver.pin_vcpus(host, "pin-1", {0: (0,), 1: (1,)})
    with pytest.raises(InvalidInput, match="at least as many host CPUs"):
        driver.pin_vcpus(host, "pin-1", {0: (1,)})
    with pytest.raises(InvalidInput, match="has CPUs 0-1"):
        driver.pin_vcpus(host, "pin-1", {0: (5, 6)})
    assert list(vm.config.cpuAffinity.affinitySet) == [0, 1]
    assert "pin_vcpus" not in driver.supported_operations(env["hosts"]["DC0-C0"])


def test_vmotion_moves_the_vm(env) -> None:
    source, _ = make(env, "DC0-C0-H0", "mv-1", "52:54:00:10:00:05")
    driver, vm = env["driver"], vm_in_vcenter(env["si"], "52:54:00:10:00:05")
    driver.start_partition(source, "mv-1")
    dest = env["hosts"]["DC0-C0-H1"]
    driver.migrate_partition(source, "mv-1", dest)
    env["made"][-1] = (dest, "mv-1")
    assert vm.runtime.host.name == "DC0_C0_H1" and vm.runtime.powerState == "poweredOn"
    host_vms = {h.name: [v.name for v in h.vm] for h in [vm.runtime.host]}
    assert vm.name in host_vms["DC0_C0_H1"]
    assert [p.name for p in driver.list_partitions(dest)] == ["mv-1"]
    assert driver.list_partitions(source) == []
    # Offline (not live): stopped, moved, started again.
    driver.migrate_partition(dest, "mv-1", source, live=False)
    env["made"][-1] = (source, "mv-1")
    assert vm.runtime.host.name == "DC0_C0_H0" and vm.runtime.powerState == "poweredOn"
    with pytest.raises(InvalidInput, match="is on DC0-C0-H0 already"):
        driver.migrate_partition(source, "mv-1", source)
    other = replace(dest, uri="vmware://vc2/HostSystem/host-1")
    with pytest.raises(InvalidInput, match="different vCenters"):
        driver.migrate_partition(source, "mv-1", other)


def test_a_cluster_places_its_vms_itself(env) -> None:
    cluster, _info = make(env, "DC0-C0", "cl-1", "52:54:00:10:00:06")
    vm = vm_in_vcenter(env["si"], "52:54:00:10:00:06")
    assert vm.runtime.host.name in ("DC0_C0_H0", "DC0_C0_H1")
    assert refs.parse_marker(vm.config.annotation).cluster == refs.parse_host_uri(cluster.uri).moid
    assert [p.name for p in env["driver"].list_partitions(cluster)] == ["cl-1"]
    # It is the cluster's partition, not its host's.
    host = env["hosts"][vm.runtime.host.name.replace("_", "-")]
    assert "cl-1" not in [p.name for p in env["driver"].list_partitions(host)]


def test_snapshots(env) -> None:
    host, _ = make(env, "DC0-C0-H0", "sn-1", "52:54:00:10:00:07")
    driver, vm = env["driver"], vm_in_vcenter(env["si"], "52:54:00:10:00:07")
    driver.snapshot_partition(host, "sn-1", "pristine")
    driver.snapshot_partition(host, "sn-1", "later")
    assert driver.list_partition_snapshots(host, "sn-1") == ["pristine", "later"]
    names = [t.name for t in vm.snapshot.rootSnapshotList]
    assert names == ["pristine"] and vm.snapshot.rootSnapshotList[0].childSnapshotList[0].name == "later"
    driver.revert_partition(host, "sn-1", "pristine")
    assert vm.snapshot.currentSnapshot == vm.snapshot.rootSnapshotList[0].snapshot
    with pytest.raises(DriverError, match="already has a snapshot 'pristine'"):
        driver.snapshot_partition(host, "sn-1", "pristine")
    driver.remove_partition_snapshot(host, "sn-1", "later")
    assert driver.list_partition_snapshots(host, "sn-1") == ["pristine"]
    with pytest.raises(NotFound, match="has no snapshot 'later'"):
        driver.revert_partition(host, "sn-1", "later")
    with pytest.raises(InvalidInput, match="snapshot label"):
        driver.snapshot_partition(host, "sn-1", "bad label")


def test_destroy(env) -> None:
    host, _ = make(env, "DC0-C0-H0", "ds-1", "52:54:00:10:00:08")
    driver = env["driver"]
    driver.start_partition(host, "ds-1")
    driver.destroy_partition(host, "ds-1")  # powered off first
    env["made"].pop()
    assert vm_in_vcenter(env["si"], "52:54:00:10:00:08") is None
    with pytest.raises(NotFound):
        driver.destroy_partition(host, "ds-1")


def test_nothing_is_left_half_made(env) -> None:
    driver, sim = env["driver"], env["sim"]
    host = env["hosts"]["DC0-C0-H0"]
    spec = PartitionSpec(name="hm-1", cpus=1, memory_mb=512, mac="52:54:00:10:00:0a")
    # vCenter refuses the second step (the boot order): the VM it made goes again.
    sim.fail_next("ReconfigVM_Task")
    with pytest.raises(DriverError) as failed:
        driver.create_partition(host, spec)
    assert (
        "SystemError" in failed.value.message
        and "the half-made VM hm-1-10000a was removed again" in failed.value.message
    )
    assert vm_in_vcenter(env["si"], spec.mac) is None
    # ... and when removing it fails too, the VM stays marked as half made, and is no partition.
    sim.fail_next("ReconfigVM_Task")
    sim.fail_next("Destroy_Task")
    with pytest.raises(DriverError) as failed:
        driver.create_partition(host, spec)
    assert "left in vCenter, marked 'state=creating'" in failed.value.message
    left = vm_in_vcenter(env["si"], spec.mac)
    assert left is not None and refs.parse_marker(left.config.annotation).creating
    assert "hm-1" not in [p.name for p in driver.list_partitions(host)]
    # The next try removes the leftover and succeeds.
    sim.fail_next("CreateVM_Task")
    with pytest.raises(DriverError, match="creating VM hm-1-10000a on DC0-C0-H0"):
        driver.create_partition(host, spec)
    assert vm_in_vcenter(env["si"], spec.mac) is None
    driver.create_partition(host, spec)
    env["made"].append((host, "hm-1"))


def test_bad_hosts_and_specs_are_one_line(env) -> None:
    driver, host = env["driver"], env["hosts"]["DC0-C0-H0"]
    spec = PartitionSpec(name="bad-1", cpus=1, memory_mb=512, mac="52:54:00:10:00:0b")
    with pytest.raises(InvalidInput, match=r"has no port group 'nope'.*VM Network"):
        driver.create_partition(replace(host, network="nope"), spec)
    with pytest.raises(InvalidInput, match="unknown vmware host setting"):
        driver.create_partition(replace(host, settings={"colour": "red"}), spec)
    with pytest.raises(InvalidInput, match="nic='virtio'"):
        driver.create_partition(replace(host, settings={"nic": "virtio"}), spec)
    with pytest.raises(InvalidInput, match="no accessible datastore 'nope'"):
        driver.create_partition(replace(host, settings={"datastore": "nope"}), spec)
    with pytest.raises(InvalidInput, match="has no vCenter reference"):
        driver.host_info(replace(host, uri=None))
    with pytest.raises(InvalidInput, match="is not a vCenter reference"):
        driver.host_info(replace(host, uri="qemu:///system"))
    with pytest.raises(NotFound, match="vCenter vc1 no longer has"):
        driver.list_partitions(replace(host, uri="vmware://vc1/HostSystem/host-999"))
    with pytest.raises(NotFound, match="vCenter connection 'vc9' does not exist"):
        driver.list_partitions(replace(host, uri="vmware://vc9/HostSystem/host-1"))
    with pytest.raises(InvalidInput, match="multiples of 4 MB"):
        driver.create_partition(host, replace(spec, memory_mb=513))
    assert vm_in_vcenter(env["si"], spec.mac) is None


def test_e1000_nic_on_a_distributed_port_group(env) -> None:
    host = replace(env["hosts"]["DC0-C0-H1"], network="DC0_DVPG0", settings={"nic": "e1000e"})
    env["driver"].create_partition(
        host, PartitionSpec(name="dv-1", cpus=1, memory_mb=256, mac="52:54:00:10:00:0c")
    )
    env["made"].append((host, "dv-1"))
    vm = vm_in_vcenter(env["si"], "52:54:00:10:00:0c")
    nic = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard))
    assert isinstance(nic, vim.vm.device.VirtualE1000e)
    assert isinstance(nic.backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo)
    assert nic.backing.port.portgroupKey == "dvportgroup-13" or nic.backing.port.portgroupKey


def test_host_info(env) -> None:
    driver, si = env["driver"], env["si"]
    host = env["hosts"]["DC0-C0-H0"]
    info = driver.host_info(host)
    content = si.RetrieveContent()
    esx = next(
        h
        for h in content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True).view
        if h.name == "DC0_C0_H0"
    )
    assert info.hypervisor == "vmware" and info.version == esx.summary.config.product.version
    assert info.cpus == esx.summary.hardware.numCpuThreads
    assert info.memory_mb == esx.summary.hardware.memorySize // 2**20
    assert info.free_memory_mb == info.memory_mb - esx.summary.quickStats.overallMemoryUsage
    cluster = driver.host_info(env["hosts"]["DC0-C0"])
    assert cluster.cpus == 2 * info.cpus


def test_tasks_that_take_time_are_waited_for_with_a_timeout(env, monkeypatch) -> None:
    """vcsim's tasks are made to run for a while (its task-delay endpoint): qrm
    follows them with WaitForUpdatesEx, and gives up after QRM_VMWARE_TASK_TIMEOUT."""
    driver, sim = env["driver"], env["sim"]
    host, _ = make(env, "DC0-C0-H0", "tk-1", "52:54:00:10:00:0d")
    vm = vm_in_vcenter(env["si"], "52:54:00:10:00:0d")
    sim.task_delay("powerOn", 1500)
    try:
        sim.reset_calls()
        started = time.monotonic()
        driver.start_partition(host, "tk-1")
        assert time.monotonic() - started >= 1.4
        assert vm.runtime.powerState == "poweredOn"
        methods = sim.soap_calls()["methods"]
        assert methods.get("WaitForUpdatesEx", 0) >= 1 and methods.get("CreatePropertyCollector") == 1
    finally:
        sim.task_delay("powerOn", 0)
    monkeypatch.setenv("QRM_VMWARE_TASK_TIMEOUT", "1")
    driver._vmware = None  # read the settings again
    sim.task_delay("powerOff", 4000)
    try:
        with pytest.raises(DriverError) as late:
            driver.stop_partition(host, "tk-1", force=True)
        assert late.value.message == (
            "powering off VM tk-1-10000d did not finish within 1 s (QRM_VMWARE_TASK_TIMEOUT); "
            "it may still complete in vCenter"
        )
    finally:
        sim.task_delay("powerOff", 0)
    deadline = time.monotonic() + 10
    while vm.runtime.powerState != "poweredOff" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vm.runtime.powerState == "poweredOff"  # vCenter finished it after qrm gave up
