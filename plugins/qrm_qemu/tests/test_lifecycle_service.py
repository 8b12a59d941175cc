"""What ``qrm server`` runs for the qemu plugin: the lifecycle watcher found through the
plugin's ``qrm_collect_services`` hook, over every host resource that runs qemu
(``hypervisor_hosts``). A partition paused, destroyed or undefined behind qrm's back is
in qrm's records within a second; an unreachable host is an event on the host. On
libvirt's test driver (each host a node file); the hosts are registered the way a user
does, ``qrm resource add --hypervisor qemu --libvirt-uri URI``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from qrm_libvirt.connections import pool
from qrm_libvirt.testing import test_host, wait_until


def partitions(qrm_cli) -> dict[str, dict]:
    shown = qrm_cli("partition", "list", "-o", "json")
    assert shown.exit_code == 0, shown.stderr
    return {p["name"]: p for p in shown.json()}


def event_rows(qrm_cli) -> list[dict]:
    shown = qrm_cli("events", "-l", "200", "-o", "json")
    assert shown.exit_code == 0, shown.stderr
    return shown.json()


def events(qrm_cli) -> list[str]:
    return [e["message"] for e in event_rows(qrm_cli)]


@pytest.fixture
def watcher(qrm_settings, libvirt):
    """The services the installed plugins give ``qrm server``: the qemu watcher, started."""
    from qrm_core.plugin_api import HookContext
    from qrm_core.plugins import PluginSystem

    system = PluginSystem(qrm_settings).load()
    services = system.hooks.collect_services(HookContext(qrm_settings, "test"))
    found = [s for s in services if s.name == "qemu-lifecycle"]
    assert len(found) == 1, [s.name for s in services]
    found[0].start()
    yield found[0]
    found[0].stop()


def test_add_a_host_by_its_libvirt_uri(qrm_cli, tmp_path: Path, libvirt) -> None:
    assert qrm_cli("init").exit_code == 0
    node = test_host(tmp_path / "hosts", "hv1", cpus=4, memory_mb=8192)
    added = qrm_cli(
        "resource", "add", "--mac", "52:54:00:fe:00:01", "--hostname", "hv1", "--hypervisor", "qemu",
        "--libvirt-uri", node.uri, "--network", "br0", "--cpus", "4", "--memory", "8192", "-o", "json",
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    shown = qrm_cli("resource", "show", "hv1", "-o", "json").json()
    assert (shown["hypervisor"], shown["hypervisor_uri"], shown["network"]) == ("qemu", node.uri, "br0")
    made = qrm_cli("partition", "add", "--host", "hv1", "--count", "2", "--cpus", "1", "--memory", "128")
    assert made.exit_code == 0, made.stderr
    assert sorted(p["state"] for p in partitions(qrm_cli).values()) == ["running", "running"]
    # Bad input: one line, nothing added.
    for uri, says in (
        ("xen+ssh://root@10.0.0.9/system", "is not a qemu URI"),
        ("qemu+ext:///system?command=/bin/sh", "transport 'ext' is not accepted"),
        ("qemu+ssh://root@10.0.0.9/system?netcat=/bin/sh", "parameter 'netcat' is not accepted"),
    ):
        bad = qrm_cli(
            "resource", "add", "--mac", "52:54:00:fe:00:02", "--hostname", "hv2", "--hypervisor", "qemu",
            "--libvirt-uri", uri,
        )  # fmt: skip
        assert bad.exit_code != 0 and says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = qrm_cli("resource", "add", "--mac", "52:54:00:fe:00:02", "--libvirt-uri", node.uri)
    assert bad.exit_code != 0 and "give --hypervisor too" in bad.stderr
    assert [r["hostname"] for r in qrm_cli("resource", "list", "-o", "json").json()] == ["hv1"]
    # ...and `qrm resource set` changes it the same way, checked the same way.
    other = test_host(tmp_path / "hosts", "hv1b", cpus=4, memory_mb=8192)
    assert qrm_cli("resource", "set", "hv1", "--libvirt-uri", other.uri).exit_code == 0
    assert qrm_cli("resource", "show", "hv1", "-o", "json").json()["hypervisor_uri"] == other.uri
    refused = qrm_cli("resource", "set", "hv1", "--libvirt-uri", "xen:///system")
    assert refused.exit_code != 0 and "is not a qemu URI" in refused.stderr
    assert qrm_cli("resource", "show", "hv1", "-o", "json").json()["hypervisor_uri"] == other.uri


def test_changes_behind_qrms_back_are_recorded_within_a_second(
    qrm_cli, tmp_path: Path, libvirt, request
) -> None:
    assert qrm_cli("init").exit_code == 0
    node = test_host(tmp_path / "hosts", "hv1", cpus=4, memory_mb=8192)
    for mac, name, uri in (
        ("52:54:00:fe:00:01", "hv1", node.uri),
        ("52:54:00:fe:00:09", "hv9", f"qemu+unix:///system?socket={tmp_path}/nowhere/libvirt-sock"),
    ):
        added = qrm_cli(
            "resource", "add", "--mac", mac, "--hostname", name, "--hypervisor", "qemu", "--libvirt-uri", uri,
            "--cpus", "4", "--memory", "8192",
        )  # fmt: skip
        assert added.exit_code == 0, added.stderr
    assert (
        qrm_cli(
            "partition", "add", "--host", "hv1", "--count", "2", "--cpus", "1", "--memory", "128"
        ).exit_code
        == 0
    )
    first, second = sorted(partitions(qrm_cli))
    watcher = request.getfixturevalue("watcher")
    wait_until(
        lambda: any("qemu host hv9 cannot be reached" in m for m in events(qrm_cli)),
        timeout=10,
        what="the unreachable host's event",
    )
    conn = pool().get(node.uri, "hv1")  # the host's own connection: libvirt, not qrm, does what follows

    def seen(name: str, state: str, action) -> float:
        """Seconds from libvirt's change to qrm's event about it (the event's own time)."""
        before = {e["id"] for e in event_rows(qrm_cli)}
        started = datetime.now(UTC)
        action()
        wait_until(lambda: partitions(qrm_cli)[name]["state"] == state, timeout=5, what=f"{name} {state}")
        new = [e for e in event_rows(qrm_cli) if e["id"] not in before and e["object_name"] == name]
        assert new, f"no event about {name}"
        at = datetime.fromisoformat(new[-1]["time"])
        return ((at if at.tzinfo else at.replace(tzinfo=UTC)) - started).total_seconds()

    assert seen(first, "paused", lambda: conn.lookupByName(first).suspend()) < 1.0
    assert seen(first, "running", lambda: conn.lookupByName(first).resume()) < 1.0
    assert seen(first, "stopped", lambda: conn.lookupByName(first).destroy()) < 1.0
    dom = conn.lookupByName(second)
    dom.destroy()
    assert seen(second, "error", dom.undefine) < 1.0
    said = events(qrm_cli)
    assert any(m.startswith(f"partition {first} running -> paused") for m in said), said
    assert any(m.startswith(f"partition {second}") and "it is gone from hv1" in m for m in said), said
    assert sum("qemu host hv9 cannot be reached" in m for m in said) == 1
    assert watcher.name == "qemu-lifecycle"
