"""Core's partition commands (``qrm partition ...``) on VMware hosts: real services, real driver, real vcsim.

Each operation is checked in vCenter's own view through a separate pyVmomi
session; a vCenter task that fails changes nothing in qrm.
"""

from __future__ import annotations

import json

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from qrm_vmware import refs

# qrm's partition services run on every backend in core's tests; here SQLite and PostgreSQL.
pytestmark = pytest.mark.qrm_backends("sqlite", "postgresql")


def vms(si) -> dict[str, object]:
    """qrm's VMs in vCenter, by partition name."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        found = {}
        for vm in view.view:
            marker = refs.parse_marker(vm.config.annotation)
            if marker is not None and not marker.creating:
                found[marker.partition] = vm
        return found
    finally:
        view.Destroy()


@pytest.fixture
def site(qrm_cli, vcsim):
    r = qrm_cli(
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
    )
    assert r.exit_code == 0, r.stderr
    assert qrm_cli("vmware", "sync", "vc1").exit_code == 0
    si = vcsim.connect()
    yield si
    for vm in vms(si).values():  # the module's simulator is shared: leave it as found
        if vm.runtime.powerState != "poweredOff":
            WaitForTask(vm.PowerOffVM_Task())
        WaitForTask(vm.Destroy_Task())


def ok(qrm_cli, *args: str) -> dict | list | str:
    r = qrm_cli(*args, "-o", "json")
    assert r.exit_code == 0, (args, r.stderr)
    return json.loads(r.stdout) if r.stdout.strip() else ""


def part(qrm_cli, name: str) -> dict:
    return ok(qrm_cli, "partition", "show", name)


def test_partition_verbs_on_vmware(qrm_cli, site) -> None:
    si = site
    ok(
        qrm_cli,
        "partition",
        "add",
        "--host",
        "DC0-C0-H0",
        "--cpus",
        "1",
        "--memory",
        "256",
        "-n",
        "2",
        "--name",
        "web",
    )
    found = vms(si)
    assert sorted(found) == ["web-1", "web-2"]
    web1 = found["web-1"]
    shown = part(qrm_cli, "web-1")
    assert (shown["host"], shown["hypervisor"], shown["cpus"], shown["memory_mb"]) == (
        "DC0-C0-H0",
        "vmware",
        1,
        256,
    )
    nic = next(d for d in web1.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard))
    assert nic.macAddress == shown["mac"] and nic.addressType == "manual"
    assert web1.runtime.powerState == "poweredOn"  # added partitions boot at once
    # Power.
    ok(qrm_cli, "partition", "stop", "web-1")
    assert web1.runtime.powerState == "poweredOff" and part(qrm_cli, "web-1")["state"] == "stopped"
    ok(qrm_cli, "partition", "start", "web-1")
    assert web1.runtime.powerState == "poweredOn"
    ok(qrm_cli, "partition", "pause", "web-1")
    assert web1.runtime.powerState == "suspended" and part(qrm_cli, "web-1")["state"] == "paused"
    ok(qrm_cli, "partition", "resume", "web-1")
    assert web1.runtime.powerState == "poweredOn"
    booted = web1.summary.runtime.bootTime
    ok(qrm_cli, "partition", "reboot", "web-1")
    assert web1.summary.runtime.bootTime > booted
    # Memory and vCPUs: hot-add while running.
    ok(qrm_cli, "partition", "set", "web-1", "--memory", "512", "--cpus", "2")
    assert (web1.config.hardware.memoryMB, web1.config.hardware.numCPU) == (512, 2)
    assert (part(qrm_cli, "web-1")["memory_mb"], part(qrm_cli, "web-1")["cpus"]) == (512, 2)
    shrink = qrm_cli("partition", "set", "web-1", "--memory", "256")
    assert shrink.exit_code == 1 and "vSphere cannot take memory from a running VM" in shrink.stderr
    assert len(shrink.stderr.strip().splitlines()) == 1
    assert part(qrm_cli, "web-1")["memory_mb"] == 512 and web1.config.hardware.memoryMB == 512
    # ... or at the next power-on, said so.
    ok(qrm_cli, "partition", "set", "web-1", "--memory", "256", "--config")
    assert web1.config.hardware.memoryMB == 512
    ok(qrm_cli, "partition", "stop", "web-1")
    ok(qrm_cli, "partition", "start", "web-1")
    assert web1.config.hardware.memoryMB == 256 and part(qrm_cli, "web-1")["memory_mb"] == 256
    # Pinning = CPU affinity, one set for all vCPUs.
    ok(qrm_cli, "partition", "pin", "web-1", "0:0,1;1:0,1")
    assert list(web1.config.cpuAffinity.affinitySet) == [0, 1]
    uneven = qrm_cli("partition", "pin", "web-1", "0:0;1:1")
    assert uneven.exit_code == 1 and "one set of host CPUs" in uneven.stderr
    # vMotion: the VM moves, and qrm's partition with it.
    ok(qrm_cli, "partition", "migrate", "web-1", "--to", "DC0-C0-H1")
    assert web1.runtime.host.name == "DC0_C0_H1" and web1.runtime.powerState == "poweredOn"
    assert part(qrm_cli, "web-1")["host"] == "DC0-C0-H1"
    # Remove: the VM goes.
    ok(qrm_cli, "partition", "remove", "web-2")
    assert "web-2" not in vms(si)


def test_a_failing_vcenter_task_changes_nothing(qrm_cli, site) -> None:
    si = site
    ok(qrm_cli, "partition", "add", "--host", "DC0-C0-H1", "--cpus", "1", "--memory", "256", "--name", "db")
    ok(qrm_cli, "partition", "stop", "db-1")
    vm = vms(si)["db-1"]
    vm.MarkAsTemplate()  # an administrator's doing: vCenter refuses to reconfigure a template
    before = part(qrm_cli, "db-1")
    events_before = len(ok(qrm_cli, "events", "--limit", "1000"))
    r = qrm_cli("partition", "set", "db-1", "--memory", "512")
    assert r.exit_code == 1
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "failed: NotSupported" in line
    assert part(qrm_cli, "db-1") == before
    assert vm.config.hardware.memoryMB == 256
    events = ok(qrm_cli, "events", "--limit", "1000")
    assert not any("resized" in e["message"] for e in events[: len(events) - events_before])
    host = vm.runtime.host
    vm.MarkAsVirtualMachine(pool=host.parent.resourcePool, host=host)  # the administrator undoes it
    ok(qrm_cli, "partition", "set", "db-1", "--memory", "512")
    assert vm.config.hardware.memoryMB == 512 and part(qrm_cli, "db-1")["memory_mb"] == 512


def test_the_host_network_and_settings(qrm_cli, site) -> None:
    si = site
    ok(qrm_cli, "resource", "set", "DC0-H0", "--network", "DC0_DVPG0", "--host-setting", "nic=e1000e")
    ok(qrm_cli, "partition", "add", "--host", "DC0-H0", "--cpus", "1", "--memory", "128", "--name", "dv")
    vm = vms(si)["dv-1"]
    nic = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard))
    assert isinstance(nic, vim.vm.device.VirtualE1000e)
    assert isinstance(nic.backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo)
    r = qrm_cli("resource", "set", "DC0-H0", "--host-setting", "colour=red")
    assert r.exit_code == 1 and "unknown vmware host setting(s) colour" in r.stderr
    ok(qrm_cli, "resource", "set", "DC0-H0", "--network", "nope")
    r = qrm_cli("partition", "add", "--host", "DC0-H0", "--cpus", "1", "--memory", "128", "--name", "dv")
    assert r.exit_code == 1 and "has no port group 'nope'" in r.stderr
    assert sorted(vms(si)) == ["dv-1"]
