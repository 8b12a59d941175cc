"""Partitioned VEs on VMware, end to end: a real ``qrm server`` (engine, plugins), vcsim, and the VMs' agents.

vcsim runs no guest, so nothing PXE-boots: the test plays each powered-on
VM's node agent with the real agent protocol (core's simulated agents,
tests/agents.py), using the MAC vCenter gave the VM. Everything between qrm
and vCenter is real SOAP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from agents import VmAgents
from pyVim.task import WaitForTask
from pyVmomi import vim

from qrm_core.testing import running_server
from qrm_vmware import refs

# The engine's own database work is tested by core on every backend; here: SQLite.
pytestmark = pytest.mark.qrm_backends("sqlite")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def qrm_vms(si) -> dict[str, Any]:
    """qrm's VMs in vCenter's own view, by the partition name in their marker."""
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
def site(qrm_cli, qrm_settings, vcsim) -> Iterator[dict]:
    """A qrm server (engine every 0.2 s, heartbeats every second, 3 s timeout) with vCenter vc1 connected."""
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
    for args in (
        ("storage", "add", "-n", "st", "-t", "fake", "-i", "10.0.0.2"),
        ("filesystem-image", "add", "-n", "root", "-s", "st", "-l", "/exports/root"),
        ("boot-image", "add", "-n", "idle", "-k", "6.1", "--default"),
    ):
        r = qrm_cli(*args)
        assert r.exit_code == 0, (args, r.stderr)
    settings = qrm_settings.model_copy(update={"heartbeat_interval": 1.0, "heartbeat_timeout": 3.0})
    with running_server(settings) as server:
        # The plugin's service synced vCenter at start: its hosts are resources.
        def hosts() -> int:
            r = qrm_cli("resource", "list", "-o", "json")
            assert r.exit_code == 0, r.stderr
            return len([x for x in r.json() if x["managed_by"]])

        wait_for("the ESXi hosts", lambda: hosts() == 4)
        agents = VmAgents(server.url, server.enrollment_token(), vcsim).start()
        si = vcsim.connect()
        try:
            yield {"server": server, "agents": agents, "si": si, "cli": qrm_cli}
        finally:
            agents.close()
            for args in (("ve", "stop", "web"), ("ve", "stop", "db")):
                qrm_cli(*args)
            time.sleep(0.5)
            for vm in qrm_vms(si).values():  # leave the module's simulator as found
                if vm.runtime.powerState != "poweredOff":
                    WaitForTask(vm.PowerOffVM_Task())
                WaitForTask(vm.Destroy_Task())


def ve(cli, name: str) -> dict:
    return cli("ve", "show", name, "-o", "json").json()


def partitions(cli) -> dict[str, dict]:
    return {p["name"]: p for p in cli("partition", "list", "-o", "json").json()}


def test_failover_fences_the_vm_and_moves_the_ve(site) -> None:
    cli, si, agents = site["cli"], site["si"], site["agents"]
    r = cli(
        "ve",
        "create",
        "-n",
        "web",
        "-b",
        "idle",
        "-f",
        "root",
        "--deployment",
        "partitioned",
        "--hypervisor",
        "vmware",
        "--cpus",
        "1",
        "--memory",
        "512",
        "--failover",
    )
    assert r.exit_code == 0, r.stderr
    assert cli("ve", "start", "web").exit_code == 0
    wait_for("web running", lambda: ve(cli, "web")["state"] == "running")
    first = partitions(cli)["web-1"]
    vm1 = qrm_vms(si)["web-1"]
    assert vm1.runtime.powerState == "poweredOn"
    nic = next(d for d in vm1.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard))
    assert nic.macAddress == first["mac"] and nic.addressType == "manual"
    served_by = ve(cli, "web")["resources"]
    resource = cli("resource", "show", first["mac"], "-o", "json").json()
    assert resource["kind"] == "virtual" and resource["host"] == first["host"]
    assert resource["state"] == "active" and served_by == [resource["hostname"] or resource["mac"]]
    # The guest hangs: its agent stops, its VM keeps running in vCenter.
    agents.kill(first["mac"])
    wait_for("the VM fenced in vCenter", lambda: vm1.runtime.powerState == "poweredOff", timeout=30)

    # Released at once, the VE keeps its state with no resource until the second partition serves it:
    # wait for a resource that is not the fenced one, not merely for the fenced one to go.
    def served_again() -> bool:
        now = ve(cli, "web")
        return now["state"] == "running" and bool(now["resources"]) and now["resources"] != served_by

    wait_for("web running again on another partition", served_again)
    now = partitions(cli)
    assert now["web-1"]["state"] == "stopped"
    second = now["web-2"]
    assert second["state"] == "running" and second["ve"] == "web"
    assert qrm_vms(si)["web-2"].runtime.powerState == "poweredOn"
    events = [e["message"] for e in cli("events", "-o", "json", "--limit", "500").json()]
    assert any("partition web-1 fenced (powered off on " in m for m in events)


def test_vcenter_changes_reach_qrm(site) -> None:
    """What an administrator does in vCenter (suspend, vMotion, power off) shows in qrm through the watcher."""
    cli, si = site["cli"], site["si"]
    r = cli(
        "ve",
        "create",
        "-n",
        "db",
        "-b",
        "idle",
        "-f",
        "root",
        "--deployment",
        "partitioned",
        "--hypervisor",
        "vmware",
        "--cpus",
        "1",
        "--memory",
        "256",
    )
    assert r.exit_code == 0, r.stderr
    assert cli("ve", "start", "db").exit_code == 0
    wait_for("db running", lambda: ve(cli, "db")["state"] == "running")
    vm = qrm_vms(si)["db-1"]
    before = partitions(cli)["db-1"]
    # vMotion by the administrator (or DRS): the partition follows its VM.
    content = si.RetrieveContent()
    hosts = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True).view
    if refs.parse_marker(vm.config.annotation).cluster is None:
        here = vm.runtime.host
        there = (
            next(h for h in hosts if h != here and h.parent == here.parent)
            if isinstance(here.parent, vim.ClusterComputeResource)
            else next(h for h in hosts if h != here)
        )
        WaitForTask(vm.MigrateVM_Task(host=there, pool=there.parent.resourcePool, priority="defaultPriority"))
        label = there.name.replace("_", "-")
        wait_for("the partition to follow", lambda: partitions(cli)["db-1"]["host"] == label, timeout=20)
        resource = cli("resource", "show", before["mac"], "-o", "json").json()
        assert resource["host"] == label
    # Suspended in vCenter: paused in qrm, at once (no sync needed).
    WaitForTask(vm.SuspendVM_Task())
    wait_for("paused in qrm", lambda: partitions(cli)["db-1"]["state"] == "paused", timeout=10)
    WaitForTask(vm.PowerOnVM_Task())
    wait_for("running in qrm", lambda: partitions(cli)["db-1"]["state"] == "running", timeout=10)
