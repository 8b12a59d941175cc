"""Partitions as an operator uses them (openQRM's Partitions tab and Xen-Config
actions): through the CLI (local and remote) and the REST API, on every
database, with the fake hypervisor core ships and a driver that supports only
some operations. Every rule refuses in one line and changes nothing."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from partitionkit import (
    HOSTS,
    PartialHypervisor,
    add_hosts,
    add_ve,
    boot_partitions,
    fake_state,
    start_ve,
)

from qrm_core.config import Settings, get_settings
from qrm_core.drivers.base import HypervisorDriver
from qrm_core.drivers.fake import FakeHypervisor
from qrm_core.errors import InvalidInput
from qrm_core.logs import log_file
from qrm_core.plugins import HYPERVISOR_GROUP, PluginSystem, set_plugin_system
from qrm_core.services import agent, service_context
from qrm_core.services import virtual_environments as ves


@dataclass
class Site:
    settings: Settings
    plugins: PluginSystem
    hosts: dict[str, int]

    def boot(self, parts: list[dict[str, Any]]) -> dict[str, tuple[int, str]]:
        return boot_partitions(self.settings, self.plugins, [SimpleNamespace(**p) for p in parts])


@pytest.fixture
def site(qrm_cli) -> Iterator[Site]:
    """An initialised site whose CLI sees the partial driver too, with hosts hv1, hv2, bare and hv9."""
    assert qrm_cli("init").exit_code == 0
    settings = get_settings()  # the very settings object 'qrm' runs with
    plugins = PluginSystem(settings).load()
    plugins.add_driver(HYPERVISOR_GROUP, PartialHypervisor(settings))
    set_plugin_system(plugins)
    yield Site(settings, plugins, add_hosts(settings, plugins))
    set_plugin_system(None)


def run(qrm_cli, command: str, *, remote: tuple[str, ...] = ()) -> Any:
    """``qrm`` with a command line written as one string."""
    return qrm_cli(*remote, *shlex.split(command))


def ok(result) -> Any:
    assert result.exit_code == 0, result.stderr
    return result


def _partitions_by_name(qrm_cli) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in ok(qrm_cli("partition", "list", "-o", "json")).json()}


def test_partitions_as_an_operator_uses_them(site: Site, qrm_cli) -> None:
    made = ok(run(qrm_cli, "partition add --host hv1 --count 3 --cpus 1 --memory 1024"))
    assert "added 3 partition(s) on hv1 (1 CPUs, 1024 MB each): hv1-1, hv1-2, hv1-3" in made.stdout
    parts = ok(run(qrm_cli, "partition list --host hv1 -o json")).json()
    assert [(p["name"], p["state"], p["host"]) for p in parts] == [
        ("hv1-1", "running", "hv1"),
        ("hv1-2", "running", "hv1"),
        ("hv1-3", "running", "hv1"),
    ]
    macs = [p["mac"] for p in parts]
    assert len(set(macs)) == 3 and not set(macs) & {h[0] for h in HOSTS.values()}
    assert ok(run(qrm_cli, "partition list --host hv2 -o json")).json() == []
    on_hv1 = fake_state(site.settings, HOSTS["hv1"][0])["partitions"]
    assert {n: (p["state"], p["mac"]) for n, p in on_hv1.items()} == {
        p["name"]: ("running", p["mac"]) for p in parts
    }

    # They boot from the network and register: idle virtual resources on hv1.
    booted = site.boot(parts)
    vm = ok(qrm_cli("resource", "show", macs[0], "-o", "json")).json()
    assert (vm["kind"], vm["host"], vm["hypervisor"], vm["state"]) == ("virtual", "hv1", "fake", "idle")
    host = ok(run(qrm_cli, "resource show hv1 -o json")).json()
    assert [p["name"] for p in host["partitions"]] == ["hv1-1", "hv1-2", "hv1-3"]
    capacity = host["capacity"]
    assert (capacity["cpus_total"], capacity["cpus_used"], capacity["cpus_free"]) == (16, 3, 13)
    assert (capacity["memory_total_mb"], capacity["memory_used_mb"], capacity["memory_free_mb"]) == (
        4096,
        3072,
        1024,
    )
    table = ok(qrm_cli("resource", "show", "hv1")).stdout
    assert "capacity: 16 CPUs (4 x 4), 4096 MB (4096 x 1); 3 partition(s) use 3 CPUs, 3072 MB" in table
    assert "free: 13 CPUs, 1024 MB" in table and "Partitions" in table and "hv1-3" in table

    shown = ok(run(qrm_cli, "partition show hv1-1 -o json")).json()
    assert (shown["host"], shown["resource"], shown["resource_state"], shown["serves"]) == (
        "hv1",
        macs[0],
        "idle",
        None,
    )
    assert {"pause_partition", "pin_vcpus", "migrate_partition", "set_memory"} <= set(shown["operations"])
    assert "operations" in ok(qrm_cli("partition", "show", "hv1-1")).stdout

    # Pause and resume: the resource is paused meanwhile (not failed), idle again after.
    assert "partition hv1-1 on hv1 is paused" in ok(qrm_cli("partition", "pause", "hv1-1")).stdout
    assert ok(qrm_cli("resource", "show", macs[0], "-o", "json")).json()["state"] == "paused"
    assert fake_state(site.settings, HOSTS["hv1"][0])["partitions"]["hv1-1"]["state"] == "paused"
    resumed = ok(run(qrm_cli, "partition resume hv1-1 -o json")).json()
    assert resumed["state"] == "running"
    assert ok(qrm_cli("resource", "show", macs[0], "-o", "json")).json()["state"] == "idle"

    # Size: live and persistent by default; --config from the next start (the record keeps what runs).
    assert "2 CPUs, 512 MB" in ok(run(qrm_cli, "partition set hv1-1 --memory 512 --cpus 2")).stdout
    running = fake_state(site.settings, HOSTS["hv1"][0])["partitions"]["hv1-1"]
    assert (running["cpus"], running["memory_mb"], running["config"]["cpus"]) == (2, 512, 2)
    later = ok(run(qrm_cli, "partition set hv1-1 --cpus 3 --config -o json")).json()
    assert later["cpus"] == 2
    assert fake_state(site.settings, HOSTS["hv1"][0])["partitions"]["hv1-1"]["config"]["cpus"] == 3

    # Pinning (parse_pinning's syntax), then a reboot applies the definition.
    pinned = ok(qrm_cli("partition", "pin", "hv1-1", "0:2,3;1:1", "-o", "json")).json()
    assert pinned["cpu_pinning"] == "0:2,3;1:1"
    assert fake_state(site.settings, HOSTS["hv1"][0])["partitions"]["hv1-1"]["pinning"] == {
        "0": [2, 3],
        "1": [1],
    }
    rebooted = ok(run(qrm_cli, "partition reboot hv1-1 -o json")).json()
    assert (rebooted["state"], rebooted["cpus"]) == ("running", 3)

    # Stop (the idle resource is off) and start again.
    assert "is stopped" in ok(qrm_cli("partition", "stop", "hv1-3")).stdout
    assert ok(qrm_cli("resource", "show", macs[2], "-o", "json")).json()["state"] == "off"
    assert "is running" in ok(qrm_cli("partition", "start", "hv1-3")).stdout

    # Live migration: the resource keeps its id, MAC and token; its host link moves.
    rid, token = booted["hv1-1"]
    moved = ok(run(qrm_cli, "partition migrate hv1-1 --to hv2 -o json")).json()
    assert (moved["host"], moved["state"], moved["cpu_pinning"]) == ("hv2", "running", "")
    vm = ok(qrm_cli("resource", "show", str(rid), "-o", "json")).json()
    assert (vm["id"], vm["mac"], vm["host"]) == (rid, macs[0], "hv2")
    assert "hv1-1" not in fake_state(site.settings, HOSTS["hv1"][0])["partitions"]
    assert fake_state(site.settings, HOSTS["hv2"][0])["partitions"]["hv1-1"]["state"] == "running"
    with service_context(site.settings, plugins=site.plugins) as ctx:
        answer = agent.heartbeat(
            ctx, resource_id=rid, token=token, state="idle", boot_generation=vm["boot_generation"]
        )
    assert answer.command == "none"
    # Offline back: moved stopped, started again where it now lives.
    back = ok(run(qrm_cli, "partition migrate hv1-1 --to hv1 --offline -o json")).json()
    assert (back["host"], back["state"]) == ("hv1", "running")

    assert "are as recorded" in ok(qrm_cli("partition", "sync", "--host", "hv1")).stdout

    # Remove: the VM and the resource it became are gone.
    assert "destroyed partition hv1-3 on hv1" in ok(qrm_cli("partition", "remove", "hv1-3")).stdout
    assert "hv1-3" not in fake_state(site.settings, HOSTS["hv1"][0])["partitions"]
    assert qrm_cli("resource", "show", macs[2]).exit_code == 1
    assert set(_partitions_by_name(qrm_cli)) == {"hv1-1", "hv1-2"}

    # Every operation is an event, with who did it.
    events = ok(run(qrm_cli, "events --limit 500 -o json")).json()
    said = [e["message"] for e in events if e["object_type"] == "partition" and e["actor"] == "tester"]
    for what in ("added on hv1", "hv1 paused", "hv1 resumed", "resized", "pinned", "rebooted", "stopped"):
        assert any(what in line for line in said), (what, said)
    assert any(
        re.search(r"migrated \(live\) from hv1 to hv2; the move took \d+\.\d s$", line) for line in said
    )
    assert any("migrated (offline) from hv2 to hv1 and started again" in line for line in said)
    assert any("destroyed on hv1" in line for line in said)


def test_names_prefixes_and_hypervisors(site: Site, qrm_cli) -> None:
    ok(run(qrm_cli, "partition add --host hv2 -n 2 --cpus 1 --memory 256 --name db"))
    ok(run(qrm_cli, "partition add --host hv1 --cpus 1 --memory 256 --name db"))
    # Names qrm picks are unique site-wide, so a name alone finds the partition.
    assert {n: p["host"] for n, p in _partitions_by_name(qrm_cli).items()} == {
        "db-1": "hv2",
        "db-2": "hv2",
        "db-3": "hv1",
    }
    # A host without a hypervisor of its own gets one with 'resource set'.
    ok(run(qrm_cli, "resource set bare --hypervisor fake --network br-prov"))
    made = ok(run(qrm_cli, "partition add --host bare --cpus 2 --memory 512 -o json")).json()
    assert [(p["name"], p["hypervisor"]) for p in made] == [("bare-1", "fake")]
    shown = ok(run(qrm_cli, "resource show bare -o json")).json()
    assert shown["network"] == "br-prov" and shown["capacity"]["hypervisors"] == ["fake"]


def test_a_driver_with_only_some_operations(site: Site, qrm_cli) -> None:
    ok(run(qrm_cli, "partition add --host hv9 --count 2 --cpus 1 --memory 512"))
    ops = set(ok(run(qrm_cli, "partition show hv9-1 -o json")).json()["operations"])
    assert {"pause_partition", "unpause_partition", "set_memory"} <= ops
    assert not ops & {"pin_vcpus", "migrate_partition", "reboot_partition"}
    # What it has works...
    ok(qrm_cli("partition", "pause", "hv9-1"))
    ok(qrm_cli("partition", "resume", "hv9-1"))
    ok(run(qrm_cli, "partition set hv9-1 --memory 256"))
    # ...what it has not is refused in one line, before anything changes.
    ok(run(qrm_cli, "resource set bare --hypervisor partial"))  # somewhere to migrate to
    before = _snapshot(site, qrm_cli)
    for args, line in (
        (("pin", "hv9-1", "0:1"), "partial on hv9 cannot pin CPUs"),
        (("reboot", "hv9-1"), "partial on hv9 cannot reboot partitions"),
        (("migrate", "hv9-1", "--to", "bare"), "partial on hv9 cannot migrate partitions"),
    ):
        result = qrm_cli("partition", *args)
        assert (result.exit_code, result.stderr) == (1, f"error: {line}\n"), (args, result.stderr)
    assert _snapshot(site, qrm_cli) == before


def _snapshot(site: Site, qrm_cli) -> tuple[Any, ...]:
    return (
        ok(run(qrm_cli, "events --limit 1000 -o json")).json(),
        ok(qrm_cli("partition", "list", "-o", "json")).json(),
        ok(qrm_cli("resource", "list", "-o", "json")).json(),
        {name: fake_state(site.settings, mac) for name, (mac, *_) in HOSTS.items()},
    )


#: (command, what the one line says): every rule, refused with nothing changed.
REFUSALS = [
    (("add", "--host", "hv1", "--cpus", "1", "--memory", "2048"), "hv1 has 1024 of 4096 MB free"),
    (
        ("add", "--host", "hv1", "-n", "14", "--cpus", "1", "--memory", "1"),
        "no room for 14 partitions of 1 CPUs",
    ),
    (
        ("add", "--host", "hv1", "--cpus", "5", "--memory", "1"),
        "host hv1 has 4 CPUs: a partition cannot have 5",
    ),
    (("add", "--host", "bare", "--cpus", "1", "--memory", "64"), "host bare runs no hypervisor"),
    (
        ("add", "--host", "hv1", "--cpus", "1", "--memory", "64", "--hypervisor", "xen"),
        "does not run hypervisor xen",
    ),
    (
        ("add", "--host", "hv1", "--cpus", "1", "--memory", "64", "--name", "bad name"),
        "invalid partition name prefix",
    ),
    (("add", "--host", "hv1", "--cpus", "0", "--memory", "64"), "CPUs must be at least 1"),
    (("add", "--host", "nosuch", "--cpus", "1", "--memory", "64"), "resource 'nosuch' does not exist"),
    (("pin", "hv1-1", "0:4"), "host CPU 4 does not exist (the host has 4)"),
    (("pin", "hv1-1", "2:1"), "virtual CPU 2 does not exist"),
    (("pin", "hv1-1", "zero"), "is not VCPU:CPULIST"),
    (("migrate", "hv1-1", "--to", "bare"), "bare does not run hypervisor fake"),
    (("migrate", "hv1-1", "--to", "hv9"), "hv9 does not run hypervisor fake"),
    (("migrate", "hv1-1", "--to", "hv1"), "partition hv1-1 on hv1 is on hv1 already"),
    (("migrate", "hv1-2", "--to", "hv2"), "hv1-2 on hv1 is stopped: live migration needs it running"),
    (("set", "hv1-1", "--memory", "3072"), "no room for a partition of 3072 MB"),
    (("set", "hv1-1", "--memory", "1500"), "can have at most 1024 MB while running (its maximum)"),
    (("add", "--host", "hv1", "--cpus", "1", "--memory", "64", "--max-cpus", "8"), "cannot grow to 8"),
    (("migrate", "hv1-1", "--to", "hv2"), "hv2 has 0 of 8192 MB free (overcommit 1): no room"),
    (("set", "hv1-1", "--cpus", "5"), "host hv1 has 4 CPUs: a partition cannot have 5"),
    (("set", "hv1-1"), "give --memory MB and/or --cpus N"),
    (("set", "hv1-1", "--cpus", "1"), "has 1 CPUs and 1024 MB already"),
    (("set", "hv1-2", "--memory", "512", "--live"), "--live resizes a running partition"),
    (("set", "hv1-1", "--memory", "512", "--live", "--config"), "choose --live or --config, not both"),
    (("pause", "hv1-1"), "which serves virtual environment web; pause it with --force"),
    (("stop", "hv1-1"), "which serves virtual environment web; stop the virtual environment first"),
    (("remove", "hv1-1"), "serves a virtual environment; stop it first"),
    (("resume", "hv1-1"), "cannot resume partition hv1-1 on hv1: it is running"),
    (("start", "hv1-1"), "cannot start partition hv1-1 on hv1: it is running"),
    (("pause", "hv1-2"), "cannot pause partition hv1-2 on hv1: it is stopped; start it first"),
    (("start", "hv1-1", "--host", "hv2"), "partition 'hv1-1' does not exist on hv2"),
    (("show", "nosuch"), "partition 'nosuch' does not exist"),
    (("sync", "--host", "nosuch"), "resource 'nosuch' does not exist"),
]


def test_every_rule_refuses_in_one_line_and_changes_nothing(site: Site, qrm_cli) -> None:
    parts = ok(run(qrm_cli, "partition add --host hv1 -n 3 --cpus 1 --memory 1024 -o json"))
    site.boot(parts.json()[:1])  # hv1-1 registers (and will serve the VE); the others never boot
    ok(qrm_cli("partition", "stop", "hv1-2"))
    ok(run(qrm_cli, "partition add --host hv2 --cpus 1 --memory 8192"))  # hv2 is full
    add_ve(site.settings, site.plugins)
    start_ve(site.settings, site.plugins)
    assert ok(run(qrm_cli, "partition show hv1-1 -o json")).json()["serves"] == "web"
    before = _snapshot(site, qrm_cli)
    for args, line in REFUSALS:
        result = qrm_cli("partition", *args)
        assert result.exit_code == 1, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (args, result.stderr)
        assert line in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert _snapshot(site, qrm_cli) == before


def test_pausing_a_partition_that_serves_a_ve(site: Site, qrm_cli) -> None:
    parts = ok(run(qrm_cli, "partition add --host hv1 --cpus 1 --memory 512 -o json")).json()
    site.boot(parts)
    add_ve(site.settings, site.plugins)
    start_ve(site.settings, site.plugins)
    paused = ok(run(qrm_cli, "partition pause hv1-1 --force -o json")).json()
    assert paused["state"] == "paused"
    vm = ok(qrm_cli("resource", "show", parts[0]["mac"], "-o", "json")).json()
    assert (vm["state"], vm["ve"]) == ("paused", "web")
    events = ok(run(qrm_cli, "events --limit 100 -o json")).json()
    degraded = [e for e in events if e["object_type"] == "ve" and "degraded" in e["message"]]
    assert degraded and degraded[-1]["actor"] == "tester" and degraded[-1]["level"] == "warning"
    assert "no failover while it is paused" in degraded[-1]["message"]
    # Stopping it needs --force (it is paused, and serves a VE); its resource then fails (failover).
    refused = qrm_cli("partition", "stop", "hv1-1")
    assert refused.exit_code == 1 and "serves virtual environment web" in refused.stderr
    stopped = ok(run(qrm_cli, "partition stop hv1-1 --force -o json")).json()
    assert stopped["state"] == "stopped"
    assert ok(qrm_cli("resource", "show", parts[0]["mac"], "-o", "json")).json()["state"] == "error"


def test_resource_set_and_power(site: Site, qrm_cli, tmp_path) -> None:
    secret = tmp_path / "bmc-password"
    secret.write_text("s3cret-Bmc\n")
    result = ok(
        qrm_cli(
            "resource",
            "set",
            "bare",
            "--libvirt-uri",
            "qemu+ssh://root@bare/system",
            "--host-setting",
            "pool=default",
            "--host-setting",
            "api_password=hidden",
            "--power-driver",
            "fake",
            "--power-address",
            "10.9.0.3",
            "--power-user",
            "admin",
            "--power-password-file",
            str(secret),
        )
    )
    assert "set resource bare" in result.stdout
    shown = ok(run(qrm_cli, "resource show bare -o json")).json()
    assert shown["hypervisor_uri"] == "qemu+ssh://root@bare/system"
    assert shown["host_settings"] == {"api_password": "********", "pool": "default"}
    assert (shown["power_driver"], shown["power_address"], shown["power_username"]) == (
        "fake",
        "10.9.0.3",
        "admin",
    )
    assert shown["power_password_set"] is True
    assert ok(run(qrm_cli, "resource power status bare -o json")).json()["state"] in ("on", "off")
    assert "resource bare is off (fake)" in ok(qrm_cli("resource", "power", "off", "bare")).stdout
    assert ok(run(qrm_cli, "resource show bare -o json")).json()["state"] == "off"
    assert "is on" in ok(qrm_cli("resource", "power", "on", "bare")).stdout
    ok(run(qrm_cli, "resource set bare --host-setting pool="))
    assert ok(run(qrm_cli, "resource show bare -o json")).json()["host_settings"] == {
        "api_password": "********"
    }
    # The password is in no output, event or log line.
    everything = ok(run(qrm_cli, "events --limit 1000 -o json")).stdout + str(shown)
    everything += ok(qrm_cli("resource", "show", "bare")).stdout
    logs = log_file(site.settings).parent
    for log in (logs / "audit.log", logs / "qrm.log"):
        everything += log.read_text() if log.exists() else ""
    assert "s3cret-Bmc" not in everything and "hidden" not in everything
    # Mistakes: one line, nothing changed.
    vm = macs_of(site, qrm_cli)[0]
    before = _snapshot(site, qrm_cli)
    for args, line in (
        (("set", "bare", "--power-password-file", str(tmp_path / "nosuch")), "cannot read the password file"),
        (("set", "bare", "--host-setting", "novalue"), "is not KEY=VALUE"),
        (("set", "bare", "--host-setting", "bad key=1"), "invalid host setting name"),
        (("set", "bare", "--hypervisor", "nosuch"), "unknown hypervisor 'nosuch'"),
        (("set", "bare", "--power-driver", "nosuch"), "unknown power driver 'nosuch'"),
        (("set", "bare"), "give at least one setting"),
        (("set", vm, "--hypervisor", "fake"), "--hypervisor names what a physical host runs"),
        (("power", "status", "hv1"), "resource hv1 has no power controller"),
        (("set", "hv1", "--network", "a\tb"), "invalid network"),
    ):
        result = qrm_cli("resource", *args)
        assert result.exit_code == 1 and line in result.stderr and result.stderr.count("\n") == 1, (
            args,
            result.stderr,
        )
    assert _snapshot(site, qrm_cli) == before


def macs_of(site: Site, qrm_cli) -> list[str]:
    """The MACs of partitions' resources (one is made if there is none)."""
    parts = ok(qrm_cli("partition", "list", "-o", "json")).json()
    if not parts:
        parts = ok(run(qrm_cli, "partition add --host hv2 --cpus 1 --memory 64 -o json")).json()
        site.boot(parts)
    return [p["mac"] for p in parts]


# ---------------------------------------------------------------------------
# The REST API, and the CLI through it
# ---------------------------------------------------------------------------


@pytest.fixture
def api_site(qrm_server) -> Iterator[tuple[Any, Site, httpx.Client]]:
    server = qrm_server
    server.plugins.add_driver(HYPERVISOR_GROUP, PartialHypervisor(server.settings))
    hosts = add_hosts(server.settings, server.plugins)
    with server.client() as http:
        yield server, Site(server.settings, server.plugins, hosts), http


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def test_partition_operations_through_the_api(api_site) -> None:
    _server, site, http = api_site
    made = _ok(
        http.post("/api/v1/partitions", json={"host": "hv1", "count": 2, "cpus": 1, "memory_mb": 1024}), 201
    )
    assert [p["name"] for p in made] == ["hv1-1", "hv1-2"]
    site.boot(made)
    assert [p["name"] for p in _ok(http.get("/api/v1/partitions", params={"host": "hv1"}))] == [
        "hv1-1",
        "hv1-2",
    ]
    shown = _ok(http.get("/api/v1/partitions/hv1-1"))
    assert shown["resource_state"] == "idle" and "pin_vcpus" in shown["operations"]
    assert _ok(http.post("/api/v1/partitions/hv1-1/pause"))["state"] == "paused"
    assert _ok(http.post("/api/v1/partitions/hv1-1/resume"))["state"] == "running"
    assert _ok(http.post("/api/v1/partitions/hv1-1/reboot"))["state"] == "running"
    assert _ok(http.post("/api/v1/partitions/hv1-2/stop", json={"force": True}))["state"] == "stopped"
    assert _ok(http.post("/api/v1/partitions/hv1-2/start"))["state"] == "running"
    resized = _ok(http.patch("/api/v1/partitions/hv1-1", json={"memory_mb": 512, "cpus": 2, "mode": "both"}))
    assert (resized["cpus"], resized["memory_mb"]) == (2, 512)
    assert (
        _ok(http.post("/api/v1/partitions/hv1-1/pin", json={"pinning": "0:3;1:0-1"}))["cpu_pinning"]
        == "0:3;1:0,1"
    )
    moved = _ok(http.post("/api/v1/partitions/hv1-1/migrate", json={"to": "hv2"}))
    assert moved["host"] == "hv2"
    assert _ok(http.post("/api/v1/resources/hv2/sync")) == {"host": "hv2", "changes": [], "unknown": []}
    detail = _ok(http.get("/api/v1/resources/hv2"))
    assert [p["name"] for p in detail["partitions"]] == ["hv1-1"] and detail["capacity"]["cpus_used"] == 2
    settings = {
        "hypervisor": "fake",
        "power_driver": "fake",
        "power_address": "bmc3",
        "power_password": "Zq9-pw",
    }
    _ok(http.patch("/api/v1/resources/bare", json=settings))
    assert "Zq9-pw" not in http.get("/api/v1/resources/bare").text
    assert _ok(http.get("/api/v1/resources/bare/power"))["driver"] == "fake"
    assert _ok(http.post("/api/v1/resources/bare/power/on"))["state"] == "on"
    assert _ok(http.delete("/api/v1/partitions/hv1-2"))["name"] == "hv1-2"
    events = _ok(http.get("/api/v1/events", params={"limit": 200, "object_type": "partition"}))
    assert {e["actor"] for e in events if "paused" in e["message"]} == {"qrm"}


# SQLite only: HTTP status per refusal; the rules per database: test_every_rule_refuses_in_one_line_and_changes_nothing
@pytest.mark.qrm_backends("sqlite")
@pytest.mark.parametrize(
    "method, path, body, status, code",
    [
        ("post", "/api/v1/partitions", {"host": "hv1", "cpus": 1, "memory_mb": 9000}, 422, "invalid_input"),
        (
            "post",
            "/api/v1/partitions",
            {"host": "hv1", "count": 5, "cpus": 1, "memory_mb": 1024},
            409,
            "conflict",
        ),
        ("post", "/api/v1/partitions", {"host": "bare", "cpus": 1, "memory_mb": 64}, 422, "invalid_input"),
        ("post", "/api/v1/partitions", {"host": "hv1", "cpus": 0, "memory_mb": 64}, 422, "invalid_input"),
        ("post", "/api/v1/partitions/hv9-1/pin", {"pinning": "0:1"}, 409, "unsupported_operation"),
        ("post", "/api/v1/partitions/hv9-1/reboot", None, 409, "unsupported_operation"),
        ("post", "/api/v1/partitions/hv9-1/migrate", {"to": "hv2"}, 422, "invalid_input"),
        ("post", "/api/v1/partitions/hv1-1/pin", {"pinning": "0:9"}, 422, "invalid_input"),
        ("post", "/api/v1/partitions/hv1-1/migrate", {"to": "bare"}, 422, "invalid_input"),
        ("post", "/api/v1/partitions/hv1-1/resume", None, 409, "conflict"),
        ("post", "/api/v1/partitions/hv1-1/explode", None, 422, "invalid_input"),
        ("patch", "/api/v1/partitions/hv1-1", {"memory_mb": 8192}, 422, "invalid_input"),
        ("patch", "/api/v1/partitions/hv1-1", {"mode": "sometimes", "cpus": 2}, 422, "invalid_input"),
        ("get", "/api/v1/partitions/nosuch", None, 404, "not_found"),
        ("post", "/api/v1/resources/hv1/power/on", None, 422, "invalid_input"),
        ("patch", "/api/v1/resources/hv1", {"hypervisor": "nosuch"}, 422, "driver_not_found"),
    ],
)
def test_api_refusals(api_site, method, path, body, status, code) -> None:
    _server, _site, http = api_site
    _ok(http.post("/api/v1/partitions", json={"host": "hv1", "cpus": 1, "memory_mb": 1024}), 201)
    _ok(http.post("/api/v1/partitions", json={"host": "hv9", "cpus": 1, "memory_mb": 1024}), 201)
    before = (
        http.get("/api/v1/events", params={"limit": 1000}).json(),
        http.get("/api/v1/partitions").json(),
    )
    kwargs = {"json": body} if body is not None else {}
    response = getattr(http, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    after = (http.get("/api/v1/events", params={"limit": 1000}).json(), http.get("/api/v1/partitions").json())
    assert after == before


@pytest.mark.qrm_backends("sqlite")  # roles are checked before any service runs
def test_viewers_cannot_change_partitions(api_site) -> None:
    server, _site, http = api_site
    _ok(http.post("/api/v1/users", json={"name": "val", "password": "viewer-pass-1", "role": "viewer"}), 201)
    with server.client("val", "viewer-pass-1") as viewer:
        assert viewer.get("/api/v1/partitions").status_code == 200
        answer = viewer.post("/api/v1/partitions", json={"host": "hv1", "cpus": 1, "memory_mb": 64})
        assert answer.status_code == 403


def test_the_new_commands_in_remote_mode(api_site, qrm_cli) -> None:
    server, site, _http = api_site
    remote = ("--server", server.url, "-u", "qrm", "-p", "qrm")
    made = ok(run(qrm_cli, "partition add --host hv1 -n 2 --cpus 1 --memory 256 -o json", remote=remote))
    site.boot(made.json())
    assert "is paused" in ok(qrm_cli(*remote, "partition", "pause", "hv1-1")).stdout
    ok(qrm_cli(*remote, "partition", "resume", "hv1-1"))
    ok(run(qrm_cli, "partition set hv1-1 --memory 128 --config", remote=remote))
    ok(qrm_cli(*remote, "partition", "pin", "hv1-1", "0:3"))
    ok(qrm_cli(*remote, "partition", "stop", "hv1-2"))
    ok(qrm_cli(*remote, "partition", "start", "hv1-2"))
    ok(qrm_cli(*remote, "partition", "reboot", "hv1-2"))
    assert "is on hv2 (running)" in ok(run(qrm_cli, "partition migrate hv1-1 --to hv2", remote=remote)).stdout
    shown = ok(run(qrm_cli, "partition show hv1-1 -o json", remote=remote)).json()
    assert shown["host"] == "hv2" and shown["resource"] == made.json()[0]["mac"]
    assert "hv1-1" in ok(qrm_cli(*remote, "resource", "show", "hv2")).stdout
    ok(qrm_cli(*remote, "partition", "sync", "--host", "hv2"))
    ok(run(qrm_cli, "resource set bare --power-driver fake --power-address bmc3", remote=remote))
    assert "is on (fake)" in ok(qrm_cli(*remote, "resource", "power", "on", "bare")).stdout
    ok(qrm_cli(*remote, "partition", "remove", "hv1-2"))
    local = ok(qrm_cli("partition", "list", "-o", "json")).json()
    assert ok(qrm_cli(*remote, "partition", "list", "-o", "json")).json() == local
    refused = qrm_cli(*remote, "partition", "pin", "hv1-1", "0:99")
    assert (
        refused.exit_code == 1
        and refused.stderr.count("\n") == 1
        and "host CPU 99 does not exist" in refused.stderr
    )


# ---------------------------------------------------------------------------
# With the engine, and what hypervisors say
# ---------------------------------------------------------------------------


def test_a_paused_partition_is_not_failed_over(qrm_settings, qrm_plugins) -> None:
    """Pausing is on purpose: a silent paused member is not failed, its VE is
    degraded and keeps it; resumed, its heartbeat clock starts again."""
    from enginekit import Site as EngineSite

    from qrm_core.services import partitions, resources

    engine = EngineSite(qrm_settings, qrm_plugins)
    hv1_mac, cpus, memory, hypervisors = HOSTS["hv1"]
    engine.add_node(hv1_mac, cpus=cpus, memory_mb=memory, hypervisors=hypervisors)
    with service_context(engine.settings, actor="tester", plugins=qrm_plugins) as ctx:
        made = partitions.add_partitions(ctx, host=hv1_mac, count=2, cpus=1, memory_mb=512)
    for p in made:
        engine.add_node(p.mac, cpus=1, memory_mb=512)
    add_ve(engine.settings, qrm_plugins, failover=True)
    with service_context(engine.settings, actor="tester", plugins=qrm_plugins) as ctx:
        ves.start_ve(ctx, "web")
    engine.settle(5)

    def state() -> dict[str, tuple[str, str | None]]:
        with service_context(engine.settings, plugins=qrm_plugins) as ctx:
            return {
                p.name: (resources.show_resource(ctx, p.mac).state, resources.show_resource(ctx, p.mac).ve)
                for p in made
            }

    def ve_state() -> str:
        with service_context(engine.settings, plugins=qrm_plugins) as ctx:
            return ves.show_ve(ctx, "web").state

    serving = next(name for name, (_, ve) in state().items() if ve == "web")
    spare = next(p.name for p in made if p.name != serving)
    assert state()[serving] == ("active", "web") and ve_state() == "running"
    with service_context(engine.settings, actor="tester", plugins=qrm_plugins) as ctx:
        partitions.pause_partition(ctx, serving, force=True)
    vm = next(p for p in made if p.name == serving)
    engine.nodes[vm.mac].alive = False  # a paused VM says nothing
    for _ in range(20):  # 100 s: far beyond the heartbeat timeout (35 s)
        engine.step(5.0)
    assert state() == {serving: ("paused", "web"), spare: ("idle", None)}, "a paused member was failed over"
    assert ve_state() == "degraded"
    with service_context(engine.settings, actor="tester", plugins=qrm_plugins) as ctx:
        partitions.resume_partition(ctx, serving, now=engine.clock())
    engine.nodes[vm.mac].alive = True
    engine.settle(5)
    assert state()[serving] == ("active", "web") and ve_state() == "running"
    # Silent again without a pause: now it is failed, and replaced by the spare.
    engine.nodes[vm.mac].alive = False
    for _ in range(20):
        engine.step(5.0)
    assert state()[spare] == ("active", "web")


def test_what_hypervisors_say_behind_qrms_back(site: Site, qrm_cli) -> None:
    from qrm_core.drivers.base import PartitionSpec
    from qrm_core.hookspecs import hookimpl
    from qrm_core.services import partitions

    class Watcher:
        def __init__(self) -> None:
            self.seen: list[tuple[str, str, str]] = []

        @hookimpl
        def qrm_partition_state_changed(self, partition, old_state, ctx) -> None:
            self.seen.append((partition.name, old_state, partition.state))

    watcher = Watcher()
    site.plugins.register(watcher, "watcher")
    parts = ok(run(qrm_cli, "partition add --host hv1 -n 2 --cpus 1 --memory 512 -o json")).json()
    site.boot(parts)
    hv1 = site.hosts["hv1"]
    with service_context(site.settings, actor="plugin:watcher", plugins=site.plugins) as ctx:
        shown = partitions.observe_partition_state(ctx, hv1, "hv1-1", "paused", "suspended from the console")
        assert shown is not None and shown.state == "paused"
        assert partitions.observe_partition_state(ctx, hv1, "nosuch", "running") is None
        with pytest.raises(InvalidInput, match="unknown partition state 'sleeping'"):
            partitions.observe_partition_state(ctx, hv1, "hv1-1", "sleeping")
    vm = ok(qrm_cli("resource", "show", parts[0]["mac"], "-o", "json")).json()
    assert vm["state"] == "paused"
    events = ok(run(qrm_cli, "events --limit 50 -o json")).json()
    assert any(
        e["actor"] == "plugin:watcher" and "paused: suspended from the console" in e["message"]
        for e in events
    )
    assert any(e["level"] == "warning" and "'nosuch'" in e["message"] for e in events)
    with service_context(site.settings, actor="plugin:watcher", plugins=site.plugins) as ctx:
        partitions.observe_partition_state(ctx, hv1, "hv1-1", "running", "resumed from the console")
    assert ok(qrm_cli("resource", "show", parts[0]["mac"], "-o", "json")).json()["state"] == "idle"
    # Behind qrm's back: hv1-1 stopped, hv1-2 destroyed, a partition qrm did not make.
    driver = FakeHypervisor(site.settings)
    with service_context(site.settings, plugins=site.plugins) as ctx:
        from qrm_core.services.partitions import host_target
        from qrm_core.services.resources import find_resource_row

        target = host_target(find_resource_row(ctx, "hv1"))
    driver.stop_partition(target, "hv1-1")
    driver.destroy_partition(target, "hv1-2")
    driver.create_partition(target, PartitionSpec(name="stray", cpus=1, memory_mb=64))
    synced = ok(run(qrm_cli, "partition sync --host hv1 -o json")).json()
    assert synced["unknown"] == ["stray"] and len(synced["changes"]) == 2
    states = {n: p["state"] for n, p in _partitions_by_name(qrm_cli).items()}
    assert states == {"hv1-1": "stopped", "hv1-2": "error"}
    assert [ok(qrm_cli("resource", "show", p["mac"], "-o", "json")).json()["state"] for p in parts] == [
        "off",
        "off",
    ]
    assert ("hv1-1", "running", "paused") in watcher.seen and ("hv1-2", "running", "error") in watcher.seen
    assert (
        "as recorded" not in ok(qrm_cli("partition", "sync", "--host", "hv1")).stdout
    )  # stray is still there
    # A lost partition can be removed (it is gone already).
    ok(qrm_cli("partition", "remove", "hv1-2"))


class TransactionProbe(FakeHypervisor):
    """The fake hypervisor, checking at every call that no write transaction is
    open on the database (SQLite: a second writer would wait): the driver calls
    of partition operations must run between transactions."""

    name = "probe"
    description = "the fake hypervisor, checking for open transactions"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.calls: list[tuple[str, bool]] = []

    def _free(self) -> bool:
        import sqlite3

        path = self.settings.effective_database_url.removeprefix("sqlite:///")
        connection = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            connection.close()

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name in HYPERVISOR_CALLS and callable(attribute):

            def probed(*args: Any, **kwargs: Any) -> Any:
                self.calls.append((name, self._free()))
                return attribute(*args, **kwargs)

            return probed
        return attribute


HYPERVISOR_CALLS = {
    *("list_partitions", "get_partition", "create_partition", "start_partition"),
    *("stop_partition", "destroy_partition"),
    *HypervisorDriver.OPTIONAL_OPERATIONS,
}


@pytest.mark.qrm_backends("sqlite")
def test_no_driver_call_inside_a_database_transaction(site: Site, qrm_cli, qrm_backend) -> None:
    probe = TransactionProbe(site.settings)
    site.plugins.add_driver(HYPERVISOR_GROUP, probe)
    for name in ("hv1", "hv2"):
        ok(qrm_cli("resource", "set", name, "--hypervisor", "probe"))
    ok(run(qrm_cli, "partition add --host hv1 -n 2 --cpus 1 --memory 256 --hypervisor probe"))
    for args in (
        ("pause", "hv1-1"),
        ("resume", "hv1-1"),
        ("set", "hv1-1", "--memory", "128"),
        ("pin", "hv1-1", "0:1"),
        ("reboot", "hv1-1"),
        ("stop", "hv1-2"),
        ("start", "hv1-2"),
        ("migrate", "hv1-1", "--to", "hv2"),
        ("migrate", "hv1-1", "--to", "hv1", "--offline"),
        ("sync", "--host", "hv1"),
        ("remove", "hv1-2"),
    ):
        ok(qrm_cli("partition", *args))
    called = {name for name, _ in probe.calls}
    snapshots = {op for op in HYPERVISOR_CALLS if "snapshot" in op or op == "revert_partition"}
    assert HYPERVISOR_CALLS - snapshots - {"set_vcpus"} <= called, HYPERVISOR_CALLS - called
    assert [name for name, free in probe.calls if not free] == [], "a driver was called inside a transaction"


class RacingHypervisor(FakeHypervisor):
    """The fake hypervisor, with a reconcile pass of the engine running while
    it starts a partition: the engine finds the operator's partitions still
    ``creating`` and makes and records them too (two servers at once)."""

    name = "racing"
    description = "the fake hypervisor, racing the engine"

    def __init__(self, settings: Settings, plugins: PluginSystem) -> None:
        super().__init__(settings)
        self.plugins = plugins
        self.passes = 0

    def start_partition(self, host, name) -> None:
        super().start_partition(host, name)
        if not self.passes:
            from qrm_core.engine.reconciler import Reconciler

            self.passes += 1
            Reconciler(self.settings, self.plugins).tick()


@pytest.mark.qrm_backends("sqlite")
def test_the_engine_finishing_an_operators_partitions_at_the_same_time(
    site: Site, qrm_cli, qrm_backend
) -> None:
    racing = RacingHypervisor(site.settings, site.plugins)
    site.plugins.add_driver(HYPERVISOR_GROUP, racing)
    ok(run(qrm_cli, "resource set hv2 --hypervisor racing"))
    made = ok(
        run(
            qrm_cli,
            "partition add --host hv2 -n 3 --cpus 1 --memory 256 --max-cpus 2 --max-memory 512 "
            "--hypervisor racing -o json",
        )
    )
    assert racing.passes == 1
    assert [(p["name"], p["state"]) for p in made.json()] == [
        ("hv2-1", "running"),
        ("hv2-2", "running"),
        ("hv2-3", "running"),
    ]
    assert {n: p["state"] for n, p in fake_state(site.settings, HOSTS["hv2"][0])["partitions"].items()} == {
        "hv2-1": "running",
        "hv2-2": "running",
        "hv2-3": "running",
    }
    # The engine made hv2-2 and hv2-3 (the request's start of hv2-1 ran its
    # pass): they can grow as far as the operator asked, as hv2-1 can.
    assert {
        n: (p["max_cpus"], p["max_memory_mb"])
        for n, p in fake_state(site.settings, HOSTS["hv2"][0])["partitions"].items()
    } == {"hv2-1": (2, 512), "hv2-2": (2, 512), "hv2-3": (2, 512)}


def test_hypervisor_hosts_loads_only_the_hosts(qrm_ctx) -> None:
    """A lifecycle watcher asks for its hosts every few seconds in the server's
    process: the machines that are no host are not loaded as objects (they
    were, every one of them: 50-100 ms per call at 5,000 resources)."""
    import sqlalchemy as sa

    from qrm_core.models import Resource
    from qrm_core.services import resources
    from qrm_core.services.partitions import hypervisor_hosts

    for i in range(30):
        resources.add_resource(qrm_ctx, mac=f"52:54:00:00:20:{i:02x}")
    declared = resources.add_resource(
        qrm_ctx, mac="52:54:00:00:21:01", hypervisor="fake", cpus=4, memory_mb=4096
    )
    reported = resources.add_resource(qrm_ctx, mac="52:54:00:00:21:02")
    other = resources.add_resource(qrm_ctx, mac="52:54:00:00:21:03")
    # Names that contain "fake" but are not it: the database's rough match is checked again.
    lookalike = resources.add_resource(qrm_ctx, mac="52:54:00:00:21:04")
    for rid, caps in ((reported.id, ["fake"]), (other.id, ["another"]), (lookalike.id, ["fake2", "xfake"])):
        row = qrm_ctx.session.get(Resource, rid)
        row.capabilities = caps
    qrm_ctx.commit()
    qrm_ctx.session.expunge_all()

    loaded: list[int] = []

    def count(target: Resource, _context: object) -> None:
        loaded.append(target.id)

    sa.event.listen(Resource, "load", count)
    try:
        hosts = hypervisor_hosts(qrm_ctx, "fake")
    finally:
        sa.event.remove(Resource, "load", count)
    assert [h.resource_id for h in hosts] == [declared.id, reported.id]
    assert sorted(loaded) == [declared.id, reported.id]
    assert hypervisor_hosts(qrm_ctx, "another")[0].resource_id == other.id
    assert [h.resource_id for h in hypervisor_hosts(qrm_ctx, "fake2")] == [lookalike.id]
    assert hypervisor_hosts(qrm_ctx, "fak") == []
