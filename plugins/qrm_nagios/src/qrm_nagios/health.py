"""What Nagios says about one qrm object, for ``qrm resource show``, ``qrm ve show``,
the API and the console (``qrm_collect_health``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import quote

from qrm_core.plugin_api import (
    ConsoleLink,
    ConsolePanel,
    HealthCheck,
    NotFound,
    ResourcePublic,
    Settings,
    show_resource,
)
from qrm_nagios import render
from qrm_nagios.settings import NagiosSettings
from qrm_nagios.status import HostStatus, Status, StatusReader
from qrm_nagios.store import ObjectStore

SOURCE = "nagios"
_SEVERITY = {"ok": 0, "unknown": 1, "warning": 2, "critical": 3}
_HOST = {0: "ok", 1: "critical", 2: "critical"}
_SERVICE = {0: "ok", 1: "warning", 2: "critical", 3: "unknown"}

_readers: dict[Path, StatusReader] = {}
_lock = threading.Lock()


def reader(path: Path) -> StatusReader:
    """One cached reader per status file in this process."""
    with _lock:
        found = _readers.get(path)
        if found is None:
            found = _readers[path] = StatusReader(path)
        return found


def host_link(settings: NagiosSettings, nagios_host: str) -> str | None:
    if not settings.host_url:
        return None
    return settings.host_url.replace("{host}", quote(nagios_host, safe=""))


def _worst(values: list[str]) -> str:
    return max(values, key=lambda s: _SEVERITY[s]) if values else "unknown"


def describe(host: HostStatus) -> list[HealthCheck]:
    """A summary line first, then one observation per check."""
    checks: list[HealthCheck] = []
    words: list[str] = []
    host_status = _HOST.get(host.state, "unknown") if host.checked else "unknown"
    soft = "" if host.hard or not host.checked or host.state == 0 else f" ({host.kind})"
    flapping = " (flapping)" if host.flapping else ""
    words.append(f"host {host.state_name}{soft}{flapping}")
    checks.append(
        HealthCheck(f"{SOURCE}/host", host_status, f"{host.state_name}{soft}{flapping}: {host.output}")
    )
    for name in sorted(host.services, key=lambda n: (n != "ping", n != "agent", n)):
        service = host.services[name]
        status = _SERVICE.get(service.state, "unknown") if service.checked else "unknown"
        soft = "" if service.hard or not service.checked or service.state == 0 else f" ({service.kind})"
        label = "PING" if name == "ping" else name
        words.append(f"{label} {service.state_name}{soft}")
        checks.append(
            HealthCheck(f"{SOURCE}/{name}", status, f"{service.state_name}{soft}: {service.output}")
        )
    summary = HealthCheck(SOURCE, _worst([c.status for c in checks]), "Nagios: " + ", ".join(words))
    return [summary, *checks]


def stale(settings: NagiosSettings, status: Status, now: float | None = None) -> float | None:
    """How old Nagios's status is, when older than ``stale_after`` (else None)."""
    age = (now if now is not None else time.time()) - status.created
    return age if age > settings.stale_after else None


def for_host(settings: NagiosSettings, core: Settings, nagios_host: str) -> list[HealthCheck]:
    store = ObjectStore(settings, core)
    path = store.status_file()
    if path is None:
        return [HealthCheck(SOURCE, "unknown", "Nagios: no status file known (status_file in nagios.cfg)")]
    found = reader(path).host(nagios_host)
    if found is None:
        return [
            HealthCheck(SOURCE, "unknown", f"Nagios: no status yet ({path} is missing: is Nagios running?)")
        ]
    status, host = found
    if host is None:
        return [HealthCheck(SOURCE, "unknown", f"Nagios: {nagios_host} is not in Nagios's status yet")]
    result = describe(host)
    age = stale(settings, status)
    if age is not None:
        first = result[0]
        result[0] = HealthCheck(
            SOURCE,
            "unknown",
            f"{first.message} (as of {age:.0f} s ago: Nagios's status is stale, is it running?)",
        )
    return result


def for_resource(settings: NagiosSettings, core: Settings, resource: ResourcePublic) -> list[HealthCheck]:
    if not resource.ip:
        return []
    try:
        name = render.host_name(settings, resource.hostname or resource.mac)
    except render.RenderProblem as exc:
        return [HealthCheck(SOURCE, "unknown", f"Nagios: not monitored: {exc}")]
    return for_host(settings, core, name)


# ---------------------------------------------------------------------------
# The console: a link to Nagios's page and a panel per object
# ---------------------------------------------------------------------------


def nagios_host_of(
    settings: NagiosSettings, core: Settings, object_type: str, object_name: str
) -> str | None:
    """The Nagios host standing for a console object (a resource by MAC, a storage server by name)."""
    from qrm_nagios import source

    if object_type == "storage":
        return render.storage_host_name(settings, object_name)
    if object_type != "resource":
        return None
    with source.reading(core) as ctx:
        try:
            resource = show_resource(ctx, object_name)
        except NotFound:
            return None
    if not resource.ip:
        return None
    return render.host_name(settings, resource.hostname or resource.mac)


def links(settings: NagiosSettings, core: Settings, object_type: str, object_name: str) -> list[ConsoleLink]:
    if not settings.host_url:
        return []
    host = nagios_host_of(settings, core, object_type, object_name)
    url = host_link(settings, host) if host else None
    return [ConsoleLink(title="Nagios", url=url)] if url else []


def panels(
    settings: NagiosSettings, core: Settings, object_type: str, object_name: str
) -> list[ConsolePanel]:
    """What Nagios says, as rows: per check for a machine, per member for a VE."""
    if object_type == "ve":
        return _ve_panel(settings, core, object_name)
    host = nagios_host_of(settings, core, object_type, object_name)
    if host is None:
        return []
    checks = for_host(settings, core, host)
    link = host_link(settings, host)
    rows = [("Nagios host", host)] + [
        (c.source.removeprefix(f"{SOURCE}/") or "summary", c.message) for c in checks[1:]
    ]
    if len(checks) == 1:
        rows.append(("state", checks[0].message))
    return [
        ConsolePanel(
            title="Nagios",
            rows=tuple(rows),
            status=checks[0].status,
            links=(ConsoleLink(title="Nagios", url=link),) if link else (),
        )
    ]


def _ve_panel(settings: NagiosSettings, core: Settings, name: str) -> list[ConsolePanel]:
    from qrm_nagios import source

    with source.reading(core) as ctx:
        members = source.ve_members(ctx, name)
    if not members:
        return []
    rows: list[tuple[str, str]] = []
    statuses: list[str] = []
    for member in members:
        checks = for_resource(settings, core, member)
        if not checks:
            continue
        rows.append((member.hostname or member.mac, checks[0].message.removeprefix("Nagios: ")))
        statuses.append(checks[0].status)
    if not rows:
        return []
    return [ConsolePanel(title="Nagios", rows=tuple(rows), status=_worst(statuses))]
