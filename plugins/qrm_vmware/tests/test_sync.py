"""``qrm vmware sync``: vCenter's hosts and clusters become host resources (real vcsim, real databases).

What vCenter does to its hosts (disconnecting, removing) is done through a
separate pyVmomi session, as an administrator would in the vSphere client.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vcsimkit as kit
from pyVim.task import WaitForTask
from pyVmomi import vim

from qrm_vmware import refs


def objects(si, kind):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def connect(qrm_cli, sim, name: str = "vc1") -> None:
    r = qrm_cli(
        "vmware",
        "connect",
        "-n",
        name,
        "--url",
        sim.url,
        "-u",
        sim.username,
        "-p",
        sim.password,
        "--insecure",
    )
    assert r.exit_code == 0, r.stderr


def managed(qrm_cli) -> dict[str, dict]:
    return {r["hostname"]: r for r in qrm_cli("resource", "list", "-o", "json").json() if r["managed_by"]}


def test_hosts_and_clusters_become_host_resources(qrm_cli, qrm_settings, vcsim) -> None:
    connect(qrm_cli, vcsim)
    r = qrm_cli("vmware", "sync", "vc1", "-o", "json")
    assert r.exit_code == 0, r.stderr
    report = r.json()
    assert (report["hosts"], report["clusters"]) == (3, 1)
    assert sorted(report["added"]) == ["DC0-C0", "DC0-C0-H0", "DC0-C0-H1", "DC0-H0"]
    si = vcsim.connect()
    about = si.content.about
    hosts = {h.name: h for h in objects(si, vim.HostSystem)}
    resources = managed(qrm_cli)
    assert sorted(resources) == ["DC0-C0", "DC0-C0-H0", "DC0-C0-H1", "DC0-H0"]
    for name, host in hosts.items():
        res = resources[name.replace("_", "-")]
        hw = host.summary.hardware
        assert res["hypervisor"] == "vmware" and res["capabilities"] == ["vmware"]
        assert res["kind"] == "physical" and res["state"] == "idle" and res["managed_by"] == "vmware:vc1"
        assert res["cpus"] == hw.numCpuThreads
        assert res["memory_mb"] == hw.memorySize // 2**20
        assert res["free_memory_mb"] == hw.memorySize // 2**20 - host.summary.quickStats.overallMemoryUsage
        assert res["mac"] == refs.host_mac(about.instanceUuid, host._moId)
        assert res["last_seen"] is None  # no agent
        assert name in res["comment"] and "vCenter vc1" in res["comment"]
        shown = qrm_cli("resource", "show", res["hostname"], "-o", "json").json()
        assert shown["id"] == res["id"]
    cluster = objects(si, vim.ClusterComputeResource)[0]
    res = resources["DC0-C0"]
    members = [h for h in hosts.values() if h.parent == cluster]
    assert res["cpus"] == sum(h.summary.hardware.numCpuThreads for h in members)
    assert res["memory_mb"] == sum(h.summary.hardware.memorySize // 2**20 for h in members)
    assert "cluster DC0_C0" in res["comment"]
    events = [e["message"] for e in qrm_cli("events", "-o", "json").json()]
    assert any("host DC0_C0_H0 of vmware:vc1 added as resource DC0-C0-H0" in m for m in events)
    # A second sync changes nothing and records nothing.
    before = len(qrm_cli("events", "-o", "json", "--limit", "1000").json())
    again = qrm_cli("vmware", "sync", "vc1", "-o", "json").json()
    assert (again["added"], again["changed"], again["removed"], again["unchanged"]) == ([], [], [], 4)
    assert len(qrm_cli("events", "-o", "json", "--limit", "1000").json()) == before
    listing = qrm_cli("vmware", "list", "-o", "json").json()[0]
    assert listing["last_sync_result"].startswith("ok: 3 hosts, 1 clusters")
    # The console's page of a synced host: a panel naming its vCenter, a link to its vSphere Client.
    from qrm_core.plugin_api import HookContext
    from qrm_vmware import plugin

    hook_ctx = HookContext(settings=qrm_settings, actor="tester")
    mac = resources["DC0-H0"]["mac"]
    (panel,) = plugin.qrm_console_panels("resource", mac, hook_ctx)
    shown = dict(panel.rows)
    assert (panel.title, panel.status, shown["connection"], shown["kind"]) == (
        "VMware",
        "ok",
        "vc1",
        "vCenter",
    )
    assert shown["endpoint"] == "127.0.0.1" and shown["last sync"].endswith(listing["last_sync_result"])
    assert vcsim.password not in repr(panel)
    (link,) = plugin.qrm_console_links("resource", mac, hook_ctx)
    assert link.url == "https://127.0.0.1/ui/" and "vc1" in link.title
    assert plugin.qrm_console_panels("ve", "nothing", hook_ctx) == []
    assert plugin.qrm_console_links("resource", "nope", hook_ctx) == []  # unknown: no link, one warning
    # Forgetting the connection keeps its hosts, off and marked: nothing syncs them any more.
    removed = qrm_cli("vmware", "remove", "vc1")
    assert removed.exit_code == 0 and "its hosts DC0-C0, DC0-C0-H0, DC0-C0-H1, DC0-H0 stay" in removed.stdout
    left = managed(qrm_cli)
    assert {r["state"] for r in left.values()} == {"off"}
    assert all(r["comment"].startswith("gone from vmware:vc1 since ") for r in left.values())


def test_state_follows_vcenter_and_a_removed_host_is_kept(qrm_cli, vcsim_binary: Path) -> None:
    with kit.running(vcsim_binary, "-cluster", "1", "-host", "2", "-standalone-host", "1", "-vm", "0") as sim:
        connect(qrm_cli, sim)
        assert qrm_cli("vmware", "sync", "vc1").exit_code == 0
        si = sim.connect()
        hosts = {h.name: h for h in objects(si, vim.HostSystem)}
        WaitForTask(hosts["DC0_C0_H1"].DisconnectHost_Task())
        WaitForTask(hosts["DC0_H0"].EnterMaintenanceMode_Task(timeout=0))
        r = qrm_cli("vmware", "sync", "vc1", "-o", "json")
        assert r.exit_code == 0, r.stderr
        resources = managed(qrm_cli)
        assert resources["DC0-C0-H1"]["state"] == "error"
        assert resources["DC0-H0"]["state"] == "off"
        assert resources["DC0-C0"]["state"] == "idle"  # one host of the cluster is still usable
        assert resources["DC0-C0"]["cpus"] == resources["DC0-C0-H0"]["cpus"]
        events = [e["message"] for e in qrm_cli("events", "-o", "json").json()]
        assert any("DC0-C0-H1 idle -> error: vCenter reports the host disconnected" in m for m in events)
        assert any("DC0-H0 idle -> off: the host is in maintenance mode" in m for m in events)
        WaitForTask(hosts["DC0_C0_H1"].ReconnectHost_Task())
        WaitForTask(hosts["DC0_H0"].ExitMaintenanceMode_Task(timeout=0))
        assert qrm_cli("vmware", "sync", "vc1").exit_code == 0
        assert {r["state"] for r in managed(qrm_cli).values()} == {"idle"}
        # The administrator removes a host from vCenter: qrm keeps it, off and marked.
        WaitForTask(hosts["DC0_C0_H1"].Destroy_Task())
        report = qrm_cli("vmware", "sync", "vc1", "-o", "json").json()
        assert report["removed"] == ["DC0-C0-H1"]
        gone = managed(qrm_cli)["DC0-C0-H1"]
        assert gone["state"] == "off"
        assert gone["comment"].startswith("gone from vmware:vc1 since ")
        assert gone["free_memory_mb"] is None
        events = qrm_cli("events", "-o", "json").json()
        warning = [e for e in events if "no longer in vmware:vc1" in e["message"] and e["level"] == "warning"]
        assert len(warning) == 1
        # Syncing again does not repeat it; removing it in qrm is the operator's choice.
        assert qrm_cli("vmware", "sync", "vc1", "-o", "json").json()["removed"] == []
        assert qrm_cli("resource", "remove", "DC0-C0-H1").exit_code == 0
        assert "DC0-C0-H1" not in managed(qrm_cli)


def test_managed_hosts_are_never_placed_into_a_ve(qrm_cli, qrm_settings, qrm_plugins, vcsim) -> None:
    """An ESXi host has no agent to boot a VE: a single VE stays unplaced while only ESXi hosts are idle."""
    from qrm_core.engine.reconciler import Reconciler

    connect(qrm_cli, vcsim)
    assert qrm_cli("vmware", "sync", "vc1").exit_code == 0
    for args in (
        ("storage", "add", "-n", "st", "-t", "fake", "-i", "10.0.0.2"),
        ("filesystem-image", "add", "-n", "root", "-s", "st", "-l", "/exports/root"),
        ("boot-image", "add", "-n", "idle", "-k", "6.1", "--default"),
        ("ve", "create", "-n", "web", "-b", "idle", "-f", "root"),
        ("ve", "start", "web"),
    ):
        r = qrm_cli(*args)
        assert r.exit_code == 0, (args, r.stderr)
    Reconciler(qrm_settings, qrm_plugins).tick()
    ve = qrm_cli("ve", "show", "web", "-o", "json").json()
    assert ve["resources"] == [] and ve["problem"]
    assert {r["state"] for r in managed(qrm_cli).values()} == {"idle"}


def test_sync_failures_are_one_line_and_remembered(qrm_cli, vcsim_binary: Path) -> None:
    sim = kit.start(vcsim_binary, "-cluster", "0", "-standalone-host", "1")
    try:
        connect(qrm_cli, sim)
    finally:
        sim.stop()
    r = qrm_cli("vmware", "sync", "vc1")
    assert r.exit_code == 1
    assert r.stderr.strip().startswith(f"error: cannot reach vCenter at {sim.url}")
    assert len(r.stderr.strip().splitlines()) == 1
    shown = qrm_cli("vmware", "show", "vc1", "-o", "json").json()
    assert shown["last_sync_result"].startswith("failed: cannot reach vCenter")
    errors = [e for e in qrm_cli("events", "-o", "json").json() if e["level"] == "error"]
    assert any("sync of vCenter vc1 failed" in e["message"] for e in errors)
    missing = qrm_cli("vmware", "sync", "nope")
    assert (missing.exit_code, missing.stderr.strip()) == (
        1,
        "error: vCenter connection 'nope' does not exist (see 'qrm vmware list')",
    )


@pytest.mark.parametrize(
    ("name", "label"),
    [("esx01.example.com", "esx01"), ("10.0.0.5", "10-0-0-5"), ("DC0_C0_H0", "DC0-C0-H0"), ("__", "host")],
)
def test_hostnames_from_vcenter_names(name: str, label: str) -> None:
    from qrm_core.services.managed import hostname_for

    assert hostname_for(name) == label


def test_the_server_service_syncs_new_connections_and_stops_cleanly(
    qrm_cli, qrm_settings, vcsim, monkeypatch
) -> None:
    """qrm server's SyncService: a connection made while it runs is synced at its next look
    (every CONNECTION_CHECK seconds, shortened here), with a watcher; stop() ends every thread."""
    import threading
    import time

    from qrm_vmware import service
    from qrm_vmware.settings import VmwareSettings

    monkeypatch.setattr(service, "CONNECTION_CHECK", 0.3)
    svc = service.SyncService(qrm_settings, VmwareSettings())
    before = {t.name for t in threading.enumerate()}
    svc.start()
    try:
        time.sleep(0.5)
        assert managed(qrm_cli) == {}
        connect(qrm_cli, vcsim)
        deadline = time.monotonic() + 20
        while len(managed(qrm_cli)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(managed(qrm_cli)) == 4
        assert "vc1" in svc.watchers and svc.watchers["vc1"].ready.wait(10)
    finally:
        svc.stop()
    leftover = {t.name for t in threading.enumerate()} - before
    assert not {n for n in leftover if n.startswith("vmware-")}, leftover

    # Only the engine's leader runs it; a server that becomes the leader again starts it again.
    assert svc.leader_only is True
    passes = svc.passes
    svc.start()
    try:
        deadline = time.monotonic() + 20
        while not ("vc1" in svc.watchers and svc.passes > passes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert svc.passes > passes and svc.watchers["vc1"].ready.wait(10)
    finally:
        svc.stop()
    leftover = {t.name for t in threading.enumerate()} - before
    assert not {n for n in leftover if n.startswith("vmware-")}, leftover
