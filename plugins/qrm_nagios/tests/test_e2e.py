"""End to end: a real ``qrm server`` (HTTP, engine, the plugin's service with a managed
Nagios in a network namespace) and simulated agents speaking the agent protocol
over HTTP, whose machines' addresses live in the lab namespace.

* a machine whose address goes away is DOWN in Nagios and its agent CRITICAL,
  ``qrm resource show`` (API and CLI) says so, and events are recorded;
* a VE that asked for it fails over when Nagios holds its member DOWN (hard),
  and not while the state is soft, although the member's agent keeps sending
  heartbeats (so it is Nagios's word that moves the VE, not qrm's own watch).

Nagios checks only when the test forces it (its intervals are an hour), so
soft and hard states come exactly when the test says. These scenarios run
once, on SQLite; core's tests cover the rules they use on every database.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest
from nagioslab import force_host_check, hosts_in_status, quiet, services_in_status, wait_for
from sqlmodel import select

from qrm_core.context import HookContext
from qrm_core.errors import NotFound
from qrm_core.lab.simulate import NodeSpec, Simulation
from qrm_core.models import Event
from qrm_core.services import boot_images, resources, service_context, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import running_server


@pytest.fixture
def sqlite_only(qrm_backend: str) -> None:
    if qrm_backend != "sqlite":
        pytest.skip("this end-to-end scenario runs once, on SQLite (core tests its rules on every database)")


class Agents:
    """Simulated machines (the real agent protocol over HTTP) in a thread of their own."""

    def __init__(self, url: str, token: str, specs: list[NodeSpec]) -> None:
        self.sim = Simulation(url, token, reboot_delay=0.5)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.sim.run(specs),), daemon=True
        )
        self.thread.start()

    def silence(self, mac: str) -> None:
        """The machine's agent stops (as when the machine dies)."""
        self.loop.call_soon_threadsafe(self.sim.remove, mac)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.sim.stopping.set)
        self.thread.join(timeout=30)
        self.loop.close()


@contextmanager
def site(qrm_settings, lab, count: int) -> Iterator[tuple]:
    settings = qrm_settings.model_copy(update={"heartbeat_interval": 1.0, "heartbeat_timeout": 5.0})
    with running_server(settings, engine_interval=0.2) as srv:
        with service_context(srv.settings, plugins=srv.plugins) as ctx:
            storage.add_storage(ctx, name="nfs1", type="fake", address=lab.address())
            storage.add_filesystem_image(ctx, name="root", storage="nfs1", location="/exports/root")
            boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")
        specs = [NodeSpec(mac=f"52:54:00:ee:00:{i:02x}", ip=lab.address()) for i in range(1, count + 1)]
        agents = Agents(srv.url, srv.enrollment_token(), specs)
        try:
            yield srv, agents, specs
        finally:
            agents.stop()


def _events(srv) -> list[Event]:
    with service_context(srv.settings, plugins=srv.plugins) as ctx:
        return list(ctx.session.exec(select(Event).order_by(Event.id)).all())


def _resource(srv, mac):
    with service_context(srv.settings, plugins=srv.plugins) as ctx:
        try:
            return resources.show_resource(ctx, mac)
        except NotFound:
            return None


def test_a_machine_that_goes_away_is_down_and_its_agent_critical(
    sqlite_only, lab, nagios_env, nagios_paths, qrm_settings, qrm_cli, monkeypatch
) -> None:
    monkeypatch.setenv(
        "QRM_NAGIOS_HOST_URL", "https://mon.example/cgi-bin/nagios4/extinfo.cgi?type=1&host={host}"
    )
    pipe, status = nagios_paths["pipe"], nagios_paths["status"]
    with site(qrm_settings, lab, 2) as (srv, agents, specs):
        victim, other = specs
        wait_for(
            "both machines in Nagios", lambda: {victim.mac, other.mac} <= set(hosts_in_status(status)), 60
        )
        quiet(nagios_paths["cache"])
        assert force_host_check(pipe, status, victim.mac)["current_state"] == "0"
        wait_for(
            "the agent OK in Nagios",
            lambda: services_in_status(status)[(victim.mac, "agent")]["current_state"] == "0",
        )
        # The machine dies: its address is gone, its agent silent.
        lab.down(victim.ip or "")
        agents.silence(victim.mac)
        for attempt in (1, 2, 3):
            block = force_host_check(pipe, status, victim.mac)
            assert (block["current_state"], block["current_attempt"]) == ("1", str(attempt))
        assert block["state_type"] == "1"  # hard
        # qrm's own watch puts it in error after the heartbeat timeout; Nagios hears it at once.
        agent = wait_for(
            "the agent CRITICAL in Nagios",
            lambda: (s := services_in_status(status)[(victim.mac, "agent")])["current_state"] == "2" and s,
            timeout=30,
        )
        assert "resource in error" in agent["plugin_output"]
        assert force_host_check(pipe, status, other.mac)["current_state"] == "0"

        with srv.client() as api:
            detail = api.get(f"/api/v1/resources/{victim.mac}").json()
        health = {h["source"]: (h["status"], h["message"]) for h in detail["health"]}
        assert health["nagios"][0] == "critical"
        assert health["nagios"][1].startswith("Nagios: host DOWN, PING")
        assert "agent CRITICAL" in health["nagios"][1]
        assert health["nagios/host"][0] == "critical" and "PING CRITICAL" in health["nagios/host"][1]
        assert health["nagios/agent"][0] == "critical"
        shown = qrm_cli("resource", "show", victim.mac)
        assert shown.exit_code == 0 and "Nagios: host DOWN" in shown.stdout
        calm = {h["source"]: h["status"] for h in api_health(srv, other.mac)}
        assert calm["nagios/host"] == "ok" and calm["nagios/agent"] == "ok"

        # The console's panel and link for the machine (core renders them).
        hook_ctx = HookContext(settings=srv.settings, actor="tester")
        (panel,) = srv.plugins.hooks.console_panels("resource", victim.mac, hook_ctx)
        rows = dict(panel.rows)
        assert (panel.title, panel.status, rows["Nagios host"]) == ("Nagios", "critical", victim.mac)
        assert rows["host"].startswith("DOWN: ") and rows["agent"].startswith("CRITICAL: ")
        url = f"https://mon.example/cgi-bin/nagios4/extinfo.cgi?type=1&host={quote(victim.mac, safe='')}"
        assert [(link.title, link.url) for link in panel.links] == [("Nagios", url)]
        links = srv.plugins.hooks.console_links("resource", victim.mac, hook_ctx)
        assert [(link.title, link.url) for link in links] == [("Nagios", url)]
        assert srv.plugins.hooks.console_panels("boot_image", "idle", hook_ctx) == []

        messages = wait_for(
            "the events",
            lambda: (
                (
                    m := [
                        e.message
                        for e in _events(srv)
                        if e.actor == "plugin:nagios" and e.object_name == victim.mac
                    ]
                )
                and any("UP -> DOWN (hard)" in x or "-> DOWN (hard)" in x for x in m)
                and any("agent OK -> CRITICAL (hard)" in x for x in m)
                and m
            ),
        )
        assert any(f"host {victim.mac} UP -> DOWN (soft 1/3)" in m for m in messages)


def api_health(srv, mac: str) -> list[dict]:
    with srv.client() as api:
        return api.get(f"/api/v1/resources/{mac}").json()["health"]


def test_nagios_fails_a_ve_over_from_a_hard_down_and_not_while_soft(
    sqlite_only, lab, nagios_env, nagios_paths, qrm_settings
) -> None:
    pipe, status = nagios_paths["pipe"], nagios_paths["status"]
    with site(qrm_settings, lab, 2) as (srv, _agents, specs):
        wait_for(
            "both machines idle",
            lambda: all((r := _resource(srv, s.mac)) is not None and r.state == "idle" for s in specs),
            60,
        )
        with service_context(srv.settings, plugins=srv.plugins) as ctx:
            ves.create_ve(
                ctx, name="web", boot_image="idle", fs_image="root", failover=True, monitor_failover=True
            )
            ves.start_ve(ctx, "web")
        member = wait_for(
            "the VE running",
            lambda: (v := ves_show(srv, "web")).state == "running" and v.resources[0],
            60,
        )
        victim = next(s for s in specs if s.mac == member)
        other = next(s for s in specs if s.mac != member)
        wait_for("the member in Nagios", lambda: member in hosts_in_status(status))
        quiet(nagios_paths["cache"])
        assert force_host_check(pipe, status, member)["current_state"] == "0"

        # Nagios sees the member down; its agent keeps sending heartbeats to qrm.
        lab.down(victim.ip or "")
        for attempt in (1, 2):
            block = force_host_check(pipe, status, member)
            assert (block["current_state"], block["state_type"], block["current_attempt"]) == (
                "1",
                "0",
                str(attempt),
            )
        remark = wait_for(
            "the reason there is no failover",
            lambda: [
                e
                for e in _events(srv)
                if e.object_name == member and "no failover while the state is soft (1/3)" in e.message
            ],
        )
        assert remark[0].message == f"nagios: {member} serves web: no failover while the state is soft (1/3)"
        wait_for(
            "the second soft attempt recorded",
            lambda: any("no failover while the state is soft (2/3)" in e.message for e in _events(srv)),
        )
        assert _resource(srv, member).state == "active" and ves_show(srv, "web").resources == [member]

        block = force_host_check(pipe, status, member)
        assert (block["current_state"], block["state_type"]) == ("1", "1")  # DOWN, hard
        wait_for(
            "the VE on the other machine",
            lambda: (v := ves_show(srv, "web")).resources == [other.mac] and v.state == "running",
            60,
        )
        failed = [e.message for e in _events(srv) if e.object_name == member and "-> error" in e.message]
        assert failed and "active -> error: nagios: host DOWN (hard, 3/3): PING CRITICAL" in failed[0]
        # The old member answered its next heartbeat with a reboot and came back idle.
        wait_for("the old member idle", lambda: _resource(srv, member).state == "idle", 30)
        (panel,) = srv.plugins.hooks.console_panels(
            "ve", "web", HookContext(settings=srv.settings, actor="t")
        )
        assert [label for label, _ in panel.rows] == [other.mac]


def ves_show(srv, name):
    with service_context(srv.settings, plugins=srv.plugins) as ctx:
        return ves.show_ve(ctx, name)
