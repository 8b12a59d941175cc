"""Whole servers: leadership between processes, kill -9 in the middle of work,
and openQRM's own scenario end to end with simulated agents over HTTP."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from serverkit import ServerProcess, SimulationThread, free_port, server_env
from sqlmodel import select

from qrm_core.lab.simulate import NodeSpec, ip_for, mac_for
from qrm_core.models import Resource, VirtualEnvironment
from qrm_core.services import boot_images, service_context, site, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import running_server

FAST = {"QRM_HEARTBEAT_INTERVAL": "1", "QRM_HEARTBEAT_TIMEOUT": "5"}


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _seed(settings, plugins, *, ves_: dict[str, dict] | None = None) -> str:
    with service_context(settings, plugins=plugins) as ctx:
        storage.add_storage(ctx, name="st", type="fake", address="10.0.0.2")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")
        for name, options in (ves_ or {}).items():
            # Each VE its own image: a single VE's image is exported read-write to it alone.
            storage.add_filesystem_image(ctx, name=f"root-{name}", storage="st", location=f"/r/{name}")
            ves.create_ve(ctx, name=name, boot_image="idle", fs_image=f"root-{name}", **options)
        return site.get_enrollment_token(ctx)


def _specs(n: int) -> list[NodeSpec]:
    return [NodeSpec(mac=mac_for(i + 1), ip=ip_for(i + 1)) for i in range(n)]


def test_one_leader_among_servers_and_takeover(qrm_settings, qrm_plugins, tmp_path) -> None:
    """Several ``qrm server`` processes on one database: exactly one reconciles;
    when it dies (kill -9), another takes over."""
    env = server_env(qrm_settings)
    servers = [ServerProcess(env, free_port(), tmp_path / f"server{i}.log") for i in range(3)]
    try:
        for server in servers:
            server.start()
        _wait(lambda: sum(bool((s.health() or {}).get("leader")) for s in servers) == 1, 20, "one leader")
        time.sleep(1.5)  # and it stays one
        leaders = [s for s in servers if (s.health() or {}).get("leader")]
        assert len(leaders) == 1
        leaders[0].kill()
        rest = [s for s in servers if s is not leaders[0]]
        _wait(lambda: sum(bool((s.health() or {}).get("leader")) for s in rest) == 1, 20, "a new leader")
        time.sleep(1.5)
        assert sum(bool((s.health() or {}).get("leader")) for s in rest) == 1
    finally:
        for server in servers:
            server.stop()


def _check_invariants(settings, plugins) -> dict[str, list[str]]:
    with service_context(settings, plugins=plugins) as ctx:
        resources = ctx.session.exec(select(Resource)).all()
        ve_rows = {v.id: v for v in ctx.session.exec(select(VirtualEnvironment)).all()}
        ctx.session.commit()
    members: dict[str, list[str]] = {v.name: [] for v in ve_rows.values()}
    for r in resources:
        if r.ve_id is not None:
            members[ve_rows[r.ve_id].name].append(r.mac)
        if r.state in ("assigned", "booting", "active"):
            assert r.ve_id is not None
    for ve in ve_rows.values():
        assert len(members[ve.name]) <= ve.pool_size
    return members


@pytest.mark.slow
@pytest.mark.qrm_backends("sqlite", "postgresql")
def test_kill_9_during_a_burst_of_starts(qrm_settings, qrm_plugins, tmp_path) -> None:
    names = [f"ve{i}" for i in range(8)]
    token = _seed(qrm_settings, qrm_plugins, ves_={n: {} for n in names})
    port = free_port()
    env = server_env(qrm_settings, **FAST)
    server = ServerProcess(env, port, tmp_path / "server.log").start()
    url = server.url
    with SimulationThread(url, token, _specs(10), reboot_delay=0.3):
        try:
            _wait(
                lambda: len(httpx.get(url + "/api/v1/resources", auth=("qrm", "qrm")).json()["items"]) == 10,
                30,
                "10 idle resources",
            )
            started = 0
            with httpx.Client(base_url=url, auth=("qrm", "qrm")) as api:
                for name in names[:4]:
                    assert api.post(f"/api/v1/ves/{name}/start").status_code == 200
                    started += 1
            time.sleep(0.3)  # the engine is assigning and the agents are rebooting...
            server.kill()
            server = ServerProcess(env, port, tmp_path / "server.log").start()
            with httpx.Client(base_url=url, auth=("qrm", "qrm")) as api:
                for name in names[4:]:
                    assert api.post(f"/api/v1/ves/{name}/start").status_code == 200
            time.sleep(0.5)
            server.kill()  # and once more while the second half is being placed
            server = ServerProcess(env, port, tmp_path / "server.log").start()

            def all_running():
                listing = httpx.get(url + "/api/v1/ves", auth=("qrm", "qrm")).json()
                return all(v["state"] == "running" for v in listing) and len(listing) == 8

            _wait(all_running, 90, "every VE running after the crashes", interval=0.5)
            members = _check_invariants(qrm_settings, qrm_plugins)
            assert all(len(m) == 1 for m in members.values())
            assert len({mac for m in members.values() for mac in m}) == 8
        finally:
            server.stop()


@pytest.mark.qrm_backends("sqlite", "postgresql")
def test_the_articles_scenario_with_simulated_agents(qrm_settings, qrm_plugins) -> None:
    """Nodes boot and arrive idle; a VE is deployed onto one; that node is shut
    down and another takes over the VE; stopping the VE returns it to idle."""
    settings = qrm_settings.model_copy(update={"heartbeat_interval": 1.0, "heartbeat_timeout": 4.0})
    token = _seed(settings, qrm_plugins, ves_={"web": {"failover": True}})
    with (
        running_server(settings) as srv,
        SimulationThread(srv.url, token, _specs(3), reboot_delay=0.2) as sim,
    ):
        api = srv.client()
        _wait(
            lambda: api.get("/api/v1/resources", params={"state": "idle"}).json()["total"] == 3, 20, "3 idle"
        )
        api.post("/api/v1/ves/web/start").raise_for_status()
        web = _wait(
            lambda: (v := api.get("/api/v1/ves/web").json())["state"] == "running" and v, 20, "web running"
        )
        first = web["resources"][0]
        assert api.get(f"/api/v1/resources/{first}").json()["state"] == "active"

        sim.call(lambda s: s.remove(first))  # the machine is shut down
        web = _wait(
            lambda: (
                (v := api.get("/api/v1/ves/web").json())["state"] == "running"
                and len(v["resources"]) == 1
                and v["resources"] != [first]
                and v
            ),
            30,
            "another node to take over",
        )
        second = web["resources"][0]
        assert second != first
        assert api.get(f"/api/v1/resources/{first}").json()["state"] == "error"
        events = [e["message"] for e in api.get("/api/v1/events", params={"limit": 200}).json()]
        assert any("released: failed; failover" in m for m in events)

        api.post("/api/v1/ves/web/stop").raise_for_status()
        _wait(lambda: api.get("/api/v1/ves/web").json()["state"] == "stopped", 20, "web stopped")
        _wait(
            lambda: api.get(f"/api/v1/resources/{second}").json()["state"] == "idle", 20, "node back to idle"
        )
        states = Counter(r["state"] for r in api.get("/api/v1/resources").json()["items"])
        assert states == {"idle": 2, "error": 1}
        api.close()
