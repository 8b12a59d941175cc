"""qrm's objects in a real Nagios 4 (managed, in a network namespace): hosts and
hostgroups as Nagios itself reports them, one file per change, a configuration
Nagios rejects, and names that try to break out of a definition.

What Nagios runs is read from its own files (status.dat, objects.cache) with
the test's own parser, not the plugin's.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from nagioslab import (
    Lab,
    blocks,
    force_host_check,
    force_service_check,
    hosts_in_status,
    quiet,
    services_in_status,
    wait_for,
)
from sqlmodel import select

import qrm_nagios.plugin
from qrm_core.engine.reconciler import Reconciler
from qrm_core.errors import InvalidInput
from qrm_core.models import Event, utcnow
from qrm_core.services import agent, boot_images, resources, service_context, storage
from qrm_core.services import virtual_environments as ves
from qrm_nagios import control, sync
from qrm_nagios import status as nagios_status
from qrm_nagios.service import NagiosService, _session_members
from qrm_nagios.settings import load_settings
from qrm_nagios.sync import Changes


@pytest.fixture
def nagios(nagios_env, qrm_settings, qrm_plugins) -> Iterator[NagiosService]:
    """The plugin as ``qrm server`` runs it: its hooks, its worker and a managed Nagios."""
    assert qrm_plugins.register(qrm_nagios.plugin, "nagios")
    service = NagiosService(load_settings(), qrm_settings)
    service.start()
    try:
        yield service
    finally:
        service.stop()
    assert service.process is None


def settle(service: NagiosService, timeout: float = 60) -> None:
    wait_for("the plugin's worker to finish", service.idle, timeout=timeout, interval=0.05)


def ctx_of(settings, plugins):
    return service_context(settings, actor="tester", plugins=plugins)


def register(settings, plugins, mac: str, ip: str, hostname: str | None = None, **kwargs) -> int:
    with ctx_of(settings, plugins) as ctx:
        return agent.register(
            ctx, mac=mac, ip=ip, hostname=hostname, cpus=2, memory_mb=2048, **kwargs
        ).resource_id


def objects_cache(paths) -> dict[str, list[dict[str, str]]]:
    cache = paths["cache"]
    return {kind: blocks(cache, kind) for kind in ("host", "hostgroup", "service", "command")}


def identities(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for path in root.rglob("*.cfg"):
        st = path.stat()
        found[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns)
    return found


def events(settings, plugins) -> list[Event]:
    with ctx_of(settings, plugins) as ctx:
        return list(ctx.session.exec(select(Event).order_by(Event.id)).all())


@pytest.fixture
def images(qrm_settings, qrm_plugins, lab: Lab) -> str:
    with ctx_of(qrm_settings, qrm_plugins) as ctx:
        storage_address = lab.address()
        storage.add_storage(ctx, name="nfs1", type="fake", address=storage_address)
        storage.add_filesystem_image(ctx, name="root", storage="nfs1", location="/exports/root")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")
    return storage_address


def test_resources_appear_in_nagios_in_their_groups_and_leave_with_them(
    nagios, images, lab, qrm_settings, qrm_plugins, nagios_paths
) -> None:
    settings, plugins = qrm_settings, qrm_plugins
    a, b, c = lab.address(), lab.address(), lab.address()
    ida = register(settings, plugins, "52:54:00:aa:00:01", a, "node1")
    register(settings, plugins, "52:54:00:aa:00:02", b, "node2")
    idc = register(settings, plugins, "52:54:00:aa:00:03", c)
    with ctx_of(settings, plugins) as ctx:
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="root", deployment="shared", pool_size=2)
        ves.start_ve(ctx, "web")
    Reconciler(settings, plugins).tick()
    settle(nagios)
    status, cache = nagios_paths["status"], nagios_paths["cache"]
    expected = {"node1", "node2", "52:54:00:aa:00:03", "storage:nfs1", "qrm:server"}
    hosts = wait_for(
        "every host in Nagios's status",
        lambda: expected <= set(hosts_in_status(status)) and hosts_in_status(status),
    )
    assert set(hosts) == expected
    services = services_in_status(status)
    assert {("node1", "ping"), ("node1", "agent"), ("storage:nfs1", "ping")} <= set(services)
    assert hosts_in_status(status)["node1"]["check_command"] == "qrm-host-alive"
    # The plugin's fast reading of status.dat (one expression per block) agrees
    # with reading it line by line, on the file this Nagios wrote.
    data = status.read_bytes()
    assert len(nagios_status._HOSTS.findall(data)) == data.count(b"\nhoststatus {\n") == len(expected)
    assert nagios_status.parse(data) == nagios_status.parse_lines(data)
    # The groups, as Nagios resolved them.
    members = wait_for(
        "the VE's members in their hostgroup",
        lambda: (
            (
                g := {
                    h["hostgroup_name"]: set(h.get("members", "").split(",")) - {""}
                    for h in blocks(cache, "hostgroup")
                }
            )
            and len(g.get("qrm-ve-web", ())) == 2
            and g
        ),
    )
    web = members["qrm-ve-web"]
    assert web <= {"node1", "node2", "52:54:00:aa:00:03"}
    assert members["qrm-storage-nfs1"] == web | {"storage:nfs1"}
    addresses = {h["host_name"]: h["address"] for h in blocks(cache, "host")}
    assert addresses["node1"] == a and addresses["52:54:00:aa:00:03"] == c

    # One change rewrites one file: node1 comes back with a new address (booted
    # again after its agent went quiet; a live agent keeps its registration).
    before = identities(nagios_paths["objects"])
    new_address = lab.address()
    later = utcnow() + timedelta(seconds=2 * settings.heartbeat_interval)
    register(settings, plugins, "52:54:00:aa:00:01", new_address, "node1", now=later)
    settle(nagios)
    after = identities(nagios_paths["objects"])
    assert set(after) == set(before)
    assert [rel for rel in after if after[rel] != before[rel]] == [f"hosts/r{ida}.cfg"]
    wait_for(
        "node1's new address in Nagios",
        lambda: {h["host_name"]: h["address"] for h in blocks(cache, "host")}["node1"] == new_address,
    )

    # A resource that is removed leaves Nagios (the one that serves no VE).
    idle = next(rid for rid, label in ((ida, "node1"), (idc, "52:54:00:aa:00:03")) if label not in web)
    idle_label = "node1" if idle == ida else "52:54:00:aa:00:03"
    with ctx_of(settings, plugins) as ctx:
        resources.remove_resource(ctx, idle)
    settle(nagios)
    assert not (nagios_paths["objects"] / f"hosts/r{idle}.cfg").exists()
    wait_for(f"{idle_label} gone from Nagios's status", lambda: idle_label not in hosts_in_status(status))


def test_a_configuration_nagios_rejects_changes_nothing_that_runs(
    nagios, images, lab, qrm_settings, qrm_plugins, nagios_paths
) -> None:
    settings, plugins = qrm_settings, qrm_plugins
    rid = register(settings, plugins, "52:54:00:bb:00:01", lab.address(), "web1")
    with ctx_of(settings, plugins) as ctx:
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="root", monitor=["tcp:22"])
        ves.start_ve(ctx, "web")
    Reconciler(settings, plugins).tick()
    settle(nagios)
    status, cache = nagios_paths["status"], nagios_paths["cache"]
    wait_for("web1's tcp:22 check in Nagios", lambda: ("web1", "tcp:22") in services_in_status(status))
    quiet(cache)
    host_file = nagios_paths["objects"] / f"hosts/r{rid}.cfg"
    before_text = host_file.read_text()
    before_cache = cache.read_text()
    pid = nagios.pid
    seen = len(events(settings, plugins))

    # The VE asks for a check command Nagios does not know.
    with ctx_of(settings, plugins) as ctx:
        ves.set_ve(ctx, "web", monitor=["tcp:22", "nosuch:1"])
    settle(nagios)
    assert host_file.read_text() == before_text
    assert not list(nagios_paths["objects"].rglob("*.new"))
    time.sleep(2)  # (a reload, had there been one, rewrites objects.cache within this)
    assert cache.read_text() == before_cache and nagios.pid == pid
    assert ("web1", "nosuch:1") not in services_in_status(status)
    new = [e for e in events(settings, plugins)[seen:] if e.actor == "plugin:nagios"]
    assert len(new) == 1, [e.message for e in new]
    event = new[0]
    assert (event.level, event.object_type, event.object_name) == ("error", "resource", "web1")
    assert "\n" not in event.message
    assert f"Nagios rejected the new hosts/r{rid}.cfg, it keeps running the previous one" in event.message
    assert "Service check command 'nosuch!1'" in event.message and "not defined anywhere" in event.message

    # Other changes still reach Nagios meanwhile; fixing the VE applies it.
    other = register(settings, plugins, "52:54:00:bb:00:02", lab.address(), "web2")
    with ctx_of(settings, plugins) as ctx:
        ves.set_ve(ctx, "web", monitor=["tcp:22", "http:8080"])
    settle(nagios)
    assert (nagios_paths["objects"] / f"hosts/r{other}.cfg").exists()
    wait_for("the fixed check in Nagios", lambda: ("web1", "http:8080") in services_in_status(status))

    # An error qrm's files did not cause (a file someone left in qrm's directory)
    # refuses the whole change, in one line; a full sync removes the stranger.
    stranger = nagios_paths["objects"] / "hosts" / "zz-by-hand.cfg"
    stranger.write_text("define host {\n  host_name stranger\n")
    seen = len(events(settings, plugins))
    third = register(settings, plugins, "52:54:00:bb:00:03", lab.address(), "web3")
    settle(nagios)
    assert not (nagios_paths["objects"] / f"hosts/r{third}.cfg").exists()
    refused = [e for e in events(settings, plugins)[seen:] if e.actor == "plugin:nagios"]
    assert len(refused) == 1 and "\n" not in refused[0].message, [e.message for e in refused]
    assert refused[0].message.startswith(
        "nagios: Nagios rejected the new configuration, nothing was changed: "
    )
    assert "zz-by-hand.cfg" in refused[0].message
    result = sync.full_sync(load_settings(), settings)
    assert "hosts/zz-by-hand.cfg" in result.report.removed and f"hosts/r{third}.cfg" in result.report.written


def test_names_and_arguments_cannot_break_out_of_a_definition(
    nagios, images, lab, qrm_settings, qrm_plugins, nagios_paths, qrm_cli
) -> None:
    settings, plugins = qrm_settings, qrm_plugins
    # (At most 64 characters: the database's hostname column holds no more.)
    hostile = "evil\n}\ndefine command {\ncommand_name pwn\ncommand_line /bin/id\n}"
    assert len(hostile) <= 64
    # Through qrm: refused, one line each, nothing stored.
    with ctx_of(settings, plugins) as ctx:
        with pytest.raises(InvalidInput):
            agent.register(
                ctx, mac="52:54:00:cc:00:09", ip=lab.address(), hostname=hostile, cpus=1, memory_mb=1
            )
        with pytest.raises(InvalidInput):
            ves.create_ve(ctx, name="w;x", boot_image="idle", fs_image="root")
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="root")
        for check in ("http:80;reboot", "tcp:22!$USER1$", "check_x:`touch /tmp/pwned`", "http:80\n}"):
            with pytest.raises(InvalidInput):
                ves.set_ve(ctx, "web", monitor=[check])
    refused = qrm_cli("ve", "set", "web", "--monitor", "tcp:1|id")
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1

    # Past qrm's checks (rows written by something else): the plugin leaves them out.
    good = register(settings, plugins, "52:54:00:cc:00:01", lab.address(), "good1")
    bad = register(settings, plugins, "52:54:00:cc:00:02", lab.address(), "bad1")
    member = register(settings, plugins, "52:54:00:cc:00:03", lab.address(), "member1")
    with ctx_of(settings, plugins) as ctx:
        ves.start_ve(ctx, "web")
    Reconciler(settings, plugins).tick()
    settle(nagios)
    with ctx_of(settings, plugins) as ctx:
        # Whichever resource the engine chose, make every VE member look hostile too.
        conn = ctx.session.connection()
        conn.execute(sa.text("UPDATE resource SET hostname = :h WHERE id = :i"), {"h": hostile, "i": bad})
        conn.execute(
            sa.text("UPDATE virtual_environment SET monitor = :m WHERE name = 'web'"),
            {"m": json.dumps(["tcp:22", "http:80;/bin/touch /tmp/pwned", "x!y$USER1$", "ssh:22\n}"])},
        )
        ctx.session.commit()
    result = sync.full_sync(load_settings(), settings)
    assert any("resource evil" in p and "is not monitored" in p for p in result.report.problems)
    assert sum("check left out" in p for p in result.report.problems) == 3
    assert result.report.check.startswith("nagios -v: total warnings")
    everything = "".join(p.read_text() for p in nagios_paths["objects"].rglob("*.cfg"))
    assert "pwn" not in everything and "evil" not in everything and "/tmp/pwned" not in everything
    assert "/bin/id" not in everything
    assert "$USER1$" not in everything.replace("$USER1$=", "")
    assert not (nagios_paths["objects"] / f"hosts/r{bad}.cfg").exists()

    # What Nagios loaded (its object cache after the reload): qrm's hosts and commands, nothing else.
    cache = nagios_paths["cache"]
    expected_hosts = {"good1", "member1", "storage:nfs1", "qrm:server"}
    wait_for(
        "Nagios's reload",
        lambda: {h["host_name"] for h in blocks(cache, "host")} == expected_hosts,
    )
    commands = {c["command_name"] for c in blocks(cache, "command")}
    assert commands == {
        "qrm-host-alive",
        "qrm-ping",
        "qrm-tcp",
        "qrm-http",
        "qrm-https",
        "qrm-ssh",
        "qrm-smtp",
        "qrm-agent-stale",
        "qrm-notify-none",
    }
    services = {(s["host_name"], s["service_description"]) for s in blocks(cache, "service")}
    web_member = "good1" if ("good1", "tcp:22") in services else "member1"
    assert {d for h, d in services if h == web_member} == {"ping", "agent", "tcp:22"}
    assert not Path("/tmp/pwned").exists()
    del good, member


def test_commands_status_sync_and_show(
    nagios, images, lab, qrm_settings, qrm_plugins, nagios_paths, qrm_cli
) -> None:
    settings, plugins = qrm_settings, qrm_plugins
    rid = register(settings, plugins, "52:54:00:dd:00:01", lab.address(), "node1")
    settle(nagios)
    status = qrm_cli("nagios", "status", "--output", "json")
    assert status.exit_code == 0, status.stderr
    facts = status.json()
    assert (facts["mode"], facts["running"], facts["nagios pid"]) == ("managed", True, nagios.pid)
    # qrm-base.cfg (with qrm server's own host), node1, the storage server and its group
    assert facts["object files"] == 4
    # Drift: someone edits a file by hand. A dry run shows it and changes nothing; sync repairs it.
    host_file = nagios_paths["objects"] / f"hosts/r{rid}.cfg"
    good = host_file.read_text()
    host_file.write_text(good.replace("qrm-ping", "qrm-tcp!1"))
    dry = qrm_cli("nagios", "sync", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert (
        f"--- a/hosts/r{rid}.cfg" in dry.stdout
        and "-    check_command                 qrm-tcp!1" in dry.stdout
    )
    assert "would change 1 (1 written, 0 removed)" in dry.stdout
    assert host_file.read_text() != good
    listed = qrm_cli("nagios", "sync", "--dry-run", "--objects", "--output", "json").json()
    assert listed["objects"][f"hosts/r{rid}.cfg"] == good and "qrm-base.cfg" in listed["objects"]
    assert listed["written"] == [f"hosts/r{rid}.cfg"] and listed["dry_run"] is True
    applied = qrm_cli("nagios", "sync")
    assert applied.exit_code == 0 and "changed 1 (1 written, 0 removed)" in applied.stdout
    assert "Nagios told to reload" in applied.stdout
    assert host_file.read_text() == good
    again = qrm_cli("nagios", "sync", "--output", "json").json()
    assert (again["written"], again["removed"], again["check"]) == ([], [], "nothing changed")
    wait_for("node1 in Nagios's status", lambda: "node1" in hosts_in_status(nagios_paths["status"]))
    shown = qrm_cli("nagios", "show", "node1")
    assert shown.exit_code == 0 and "host_name                     node1" in shown.stdout
    assert "nagios/agent" in shown.stdout
    missing = qrm_cli("nagios", "show", "nosuch")
    assert missing.exit_code == 1 and "no resource or storage server 'nosuch'" in missing.stderr


def test_a_managed_nagios_that_dies_is_started_again(nagios, qrm_settings, qrm_plugins, nagios_paths) -> None:
    old = nagios.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)  # our own child, by its PID
    wait_for("a new Nagios", lambda: nagios.pid not in (None, old), timeout=60)
    wait_for("its command pipe", lambda: control.reader_present(nagios_paths["pipe"]), timeout=30)
    messages = [e.message for e in events(qrm_settings, qrm_plugins) if e.actor == "plugin:nagios"]
    assert any(f"the managed Nagios (pid {old}) exited with status -9" in m for m in messages), messages
    # Its workers (which outlive a killed Nagios) went with it: nothing of its session is left.
    assert _session_members(old) == []
    new = nagios.pid
    assert new is not None and _session_members(new)
    nagios.stop()
    assert _session_members(new) == []


def test_storage_servers_are_checked_for_their_protocol(nagios, lab, qrm_settings, nagios_paths) -> None:
    """An NFS server's reachability check (TCP 2049) against a listener in the lab namespace.

    (This plugin's test environment has no NFS driver to add a storage server
    of type nfs with, so the change is handed to the plugin as the hook would.)"""
    address = lab.address()
    listener = lab.lab.listen(address, 2049)
    report = sync.apply_changes(
        load_settings(), qrm_settings, Changes(storage={41: ("files", "nfs", address)})
    )
    assert report.written == ["groups/storage-files.cfg", "storage/s41.cfg"], report.to_dict()
    pipe, status = nagios_paths["pipe"], nagios_paths["status"]
    wait_for("the storage server in Nagios", lambda: ("storage:files", "nfs") in services_in_status(status))
    quiet(nagios_paths["cache"])
    up = force_service_check(pipe, status, "storage:files", "nfs")
    assert up["current_state"] == "0" and "TCP OK" in up["plugin_output"]
    listener.close()
    down = force_service_check(pipe, status, "storage:files", "nfs")
    assert down["current_state"] == "2" and "Connection refused" in down["plugin_output"]
    assert force_host_check(pipe, status, "storage:files")["current_state"] == "0"  # it still answers ping


def test_a_down_older_than_the_members_state_makes_nagios_look_again(
    nagios, images, lab, qrm_settings, qrm_plugins, nagios_paths
) -> None:
    """A member whose state changed after Nagios's last (DOWN) check is not failed
    over on that old word: Nagios is asked to check again at once."""
    settings, plugins = qrm_settings, qrm_plugins
    address = lab.address()
    rid = register(settings, plugins, "52:54:00:ff:00:01", address, "late1")
    with ctx_of(settings, plugins) as ctx:
        ves.create_ve(
            ctx, name="web", boot_image="idle", fs_image="root", failover=True, monitor_failover=True
        )
        ves.start_ve(ctx, "web")
    Reconciler(settings, plugins).tick()
    with ctx_of(settings, plugins) as ctx:  # the member booted into the VE (as its agent would say)
        agent.register(
            ctx, mac="52:54:00:ff:00:01", ip=address, hostname="late1", cpus=2, memory_mb=2048,
            boot_generation=1, mode="ve", ve="web",
        )  # fmt: skip
        row = resources.show_resource(ctx, rid)
    assert row.state in ("booting", "active")
    settle(nagios)
    status_path = nagios_paths["status"]
    wait_for("late1 in Nagios", lambda: "late1" in hosts_in_status(status_path))
    old = int(row.state_changed_at.timestamp()) - 60
    before = time.time()
    stale = nagios_status.Status(
        hosts={"late1": nagios_status.HostStatus("late1", state=1, hard=True, attempt=3, max_attempts=3,
                                                 output="PING CRITICAL", last_check=old, checked=True)}
    )  # fmt: skip
    watcher = nagios.watcher
    with ctx_of(settings, plugins) as ctx:
        ctx.session.connection().execute(
            sa.text("UPDATE resource SET state = 'active' WHERE id = :i"), {"i": rid}
        )
        ctx.session.commit()
    notes = watcher.poll(stale)
    assert [n.message for n in notes if "late1 serves web" in n.message] == [
        "nagios: late1 serves web: no failover yet: Nagios's DOWN is older than the member's current state; "
        "asked Nagios to check again"
    ]
    checked = wait_for(
        "Nagios's new check of late1",
        lambda: (b := hosts_in_status(status_path)["late1"]) and int(b["last_check"]) >= int(before) and b,
    )
    assert checked["current_state"] == "0"
    with ctx_of(settings, plugins) as ctx:
        assert resources.show_resource(ctx, rid).state == "active"
