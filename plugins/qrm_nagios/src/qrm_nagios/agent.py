"""The agent's heartbeat as a passive Nagios service that qrm reports.

A machine can answer ping while its qrm agent is dead; the ``agent`` service
makes that visible in Nagios. qrm sends each resource's heartbeat state as a
passive check result (``PROCESS_SERVICE_CHECK_RESULT``) when it changes and
again every ``agent_refresh`` seconds; if qrm stops sending (qrm server down),
Nagios's freshness check turns the service UNKNOWN by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from qrm_core.plugin_api import Settings
from qrm_nagios import control, render
from qrm_nagios.settings import NagiosSettings

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
SERVICE = "agent"


class Machine(Protocol):
    """What the agent's state is made of (a ``ResourcePublic`` or core's lean ``MonitoredResource``)."""

    @property
    def id(self) -> int: ...
    @property
    def mac(self) -> str: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def hostname(self) -> str | None: ...
    @property
    def ve(self) -> str | None: ...
    @property
    def state(self) -> str: ...
    @property
    def last_seen(self) -> datetime | None: ...
    @property
    def heartbeat_timeout(self) -> float | None: ...


def heartbeat_state(resource: Machine, core: Settings, now: datetime | None = None) -> tuple[int, str]:
    """Nagios's return code and output line for a resource's agent."""
    now = now or datetime.now(UTC)
    state = resource.state
    if state == "off":
        return OK, "OK - halted on purpose (off)"
    if resource.last_seen is None:
        return UNKNOWN, f"UNKNOWN - no heartbeat ever ({state})"
    age = max((now - resource.last_seen).total_seconds(), 0.0)
    if state == "error":
        return CRITICAL, f"CRITICAL - resource in error, last heartbeat {age:.0f} s ago"
    rebooting = state in ("assigned", "booting")
    timeout = core.boot_timeout if rebooting else (resource.heartbeat_timeout or core.heartbeat_timeout)
    if age > timeout:
        return CRITICAL, f"CRITICAL - no heartbeat for {age:.0f} s (timeout {timeout:.0f} s, {state})"
    what = f"rebooting into {resource.ve}" if rebooting and resource.ve else state
    return OK, f"OK - heartbeat {age:.0f} s ago ({what})"


def result_lines(
    settings: NagiosSettings, core: Settings, resources: Sequence[Machine], now: datetime | None = None
) -> tuple[list[str], dict[int, int]]:
    """Command lines for these resources, and each one's code (resources without an address have none)."""
    now = now or datetime.now(UTC)
    stamp = now.timestamp()
    lines: list[str] = []
    codes: dict[int, int] = {}
    for resource in resources:
        if not resource.ip:
            continue
        try:
            host = render.host_name(settings, resource.hostname or resource.mac)
        except render.RenderProblem:
            continue
        code, text = heartbeat_state(resource, core, now)
        codes[resource.id] = code
        lines.append(control.command("PROCESS_SERVICE_CHECK_RESULT", host, SERVICE, code, text, now=stamp))
    if settings.manage:
        lines.append(
            control.command(
                "PROCESS_SERVICE_CHECK_RESULT",
                render.server_host_name(settings),
                "qrm",
                OK,
                f"OK - qrm server reports {len(codes)} agents",
                now=stamp,
            )
        )
    return lines, codes
