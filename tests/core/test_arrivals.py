"""A machine that registers idle while VEs wait for resources hears where to boot
within a second, not a heartbeat interval later: the server wakes the engine at
once and answers that machine with a one-second interval for a while. With no VE
waiting, nothing changes (no engine pass per registration, the site's interval)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from qrm_core.api import agent_routes
from qrm_core.services import boot_images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.services import virtual_environments as ves

pytestmark = pytest.mark.qrm_backends("sqlite")  # the rule is the agent endpoints'; no SQL of its own


def _until(what: str, check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout} s")


def test_an_arrival_is_placed_without_waiting_a_heartbeat_interval(qrm_server: Any, monkeypatch: Any) -> None:
    settings, plugins = qrm_server.settings, qrm_server.plugins
    interval = settings.heartbeat_interval
    assert interval > agent_routes.SOON_INTERVAL
    runner = qrm_server.server.engine
    with service_context(settings, plugins=plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
        storage_service.add_filesystem_image(ctx, name="web", storage="st", size_mb=100)
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1.0")
        ves.create_ve(ctx, name="big", boot_image="idle", fs_image="web", cpus=64)
    enroll = {"Authorization": f"Bearer {qrm_server.enrollment_token()}"}

    def register(mac: str, cpus: int = 2) -> dict[str, Any]:
        body = {"mac": mac, "ip": None, "cpus": cpus, "memory_mb": 512}
        answer = c.post("/agent/v1/register", json=body, headers=enroll)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def beat(machine: dict[str, Any]) -> dict[str, Any]:
        body = {"resource_id": machine["resource_id"], "state": "idle", "boot_generation": 0}
        answer = c.post(
            "/agent/v1/heartbeat", json=body, headers={"Authorization": f"Bearer {machine['token']}"}
        )
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    with httpx.Client(base_url=qrm_server.url, timeout=30) as c:
        # No VE asked to run: the site's interval, and the engine is not woken.
        quiet = register("52:54:00:aa:01:01")
        assert quiet["heartbeat_interval"] == interval and not runner.waiting_for_resources
        assert beat(quiet)["heartbeat_interval"] == interval
        # A VE that no machine here fits (64 CPUs) waits: an arrival beats every second
        # while it does, for a while; then the site's interval again.
        with service_context(settings, plugins=plugins) as ctx:
            ves.start_ve(ctx, "big")
        _until("the engine waiting for resources", lambda: runner.waiting_for_resources)
        small = register("52:54:00:aa:01:02")
        assert small["heartbeat_interval"] == agent_routes.SOON_INTERVAL
        assert beat(small)["heartbeat_interval"] == agent_routes.SOON_INTERVAL
        assert beat(quiet)["heartbeat_interval"] == interval  # it did not arrive meanwhile
        monkeypatch.setattr(agent_routes, "SOON_FOR", 0.0)
        assert beat(small)["heartbeat_interval"] == interval
        monkeypatch.undo()
        # A VE the next arrival fits: the engine runs at once and places it; its first
        # heartbeat already says reboot (into the VE).
        with service_context(settings, plugins=plugins) as ctx:
            storage_service.add_filesystem_image(ctx, name="team", storage="st", size_mb=100)
            ves.create_ve(ctx, name="team", boot_image="idle", fs_image="team", cpus=4)
            ves.start_ve(ctx, "team")
        runner.interval = 3600.0  # from the next pass on, only a wake-up runs one
        runner.wake()
        time.sleep(1.0)  # that pass: team waits too (no idle machine has 4 CPUs)
        arrived = register("52:54:00:aa:01:03", cpus=4)
        assert arrived["heartbeat_interval"] == agent_routes.SOON_INTERVAL
        first = _until(
            "the arrival told to reboot", lambda: (b := beat(arrived))["command"] == "reboot" and b, 5.0
        )
        assert first["boot_generation"] == arrived["boot_generation"] + 1
        with service_context(settings, plugins=plugins) as ctx:
            assert ves.show_ve(ctx, "team").resources == ["52:54:00:aa:01:03"]
