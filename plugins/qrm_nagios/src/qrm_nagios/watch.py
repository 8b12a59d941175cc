"""Nagios's state back into qrm: state changes become events, and a host Nagios
holds DOWN may fail its resource over.

Failover on Nagios's word (a VE setting, off by default: ``qrm ve create
--failover --monitor-failover``) follows these rules, and every decision not
to fail over is recorded with its reason:

* only a **hard** DOWN counts: Nagios re-checks a failing host
  ``max_check_attempts`` times (soft states) before it calls it down; a soft
  DOWN is recorded ("no failover while the state is soft") and nothing else;
* a **flapping** host (Nagios's flap detection: its state changes too often)
  never fails over, so a machine that keeps coming and going cannot make qrm
  move a VE back and forth;
* UNREACHABLE (a parent, e.g. the hypervisor host, is down) is not DOWN;
* the rest is core's rule (``mark_failed``): an active member of a VE that
  asked for it, seen down after it became active. The engine then fences and
  replaces it as it does for missed heartbeats.

qrm asks once per Nagios check (a new ``last_check``), so a refusal (say, the
member was still booting) is tried again when Nagios has looked again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from qrm_core.plugin_api import (
    EventLevel,
    NotFound,
    QrmError,
    Settings,
    mark_failed,
    service_context,
    show_resource,
    show_ve,
)
from qrm_nagios import control, render, source
from qrm_nagios.settings import NagiosSettings
from qrm_nagios.status import HostStatus, Status

log = logging.getLogger("qrm.plugins.nagios")
MONITOR = "nagios"


@dataclass(frozen=True)
class Note:
    """An event to record."""

    level: EventLevel
    object_type: str
    object_name: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What to do about a DOWN host serving a VE with failover on monitoring."""

    fail: bool
    why: str


def decide(host: HostStatus) -> Decision:
    """The rule for one DOWN host (its VE asked for failover on monitoring)."""
    if host.state != 1:
        return Decision(False, f"host is {host.state_name}, not DOWN")
    if host.flapping:
        return Decision(False, "no failover: the host is flapping (its state changes too often to trust)")
    if not host.hard:
        return Decision(False, f"no failover while the state is soft ({host.attempt}/{host.max_attempts})")
    return Decision(True, f"host DOWN (hard, {host.attempt}/{host.max_attempts}): {host.output}")


class Watcher:
    """Compares each new status with the last one; remembers it across restarts."""

    def __init__(self, settings: NagiosSettings, core: Settings) -> None:
        self.settings = settings
        self.core = core
        self.path = settings.paths(core).watch_state
        self.hosts: dict[str, list[int]] = {}  # name -> [state, hard, checked]
        self.services: dict[str, list[int]] = {}  # "host;service" -> [state, hard]
        self.asked: dict[str, int] = {}  # host -> last_check qrm asked core about
        self.said: dict[str, str] = {}  # host -> last failover remark recorded
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self.hosts = {k: list(v) for k, v in data.get("hosts", {}).items()}
            self.services = {k: list(v) for k, v in data.get("services", {}).items()}
        except (OSError, ValueError, AttributeError):
            self.hosts, self.services = {}, {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(self.path.name + ".new")
        temp.write_text(json.dumps({"hosts": self.hosts, "services": self.services}))
        temp.replace(self.path)

    def poll(self, status: Status) -> list[Note]:
        """Events for what changed since the last status; failover where Nagios says so."""
        notes: list[Note] = []
        changed = False
        seen: set[str] = set()
        for name, host in status.hosts.items():
            owner = render.label_of(self.settings, name)
            if owner is None:
                continue
            seen.add(name)
            object_type, label = owner
            if host.checked:
                now = [host.state, int(host.hard), 1]
                before = self.hosts.get(name)
                if before != now:
                    changed = True
                    self.hosts[name] = now
                    if before is not None or host.state != 0:
                        notes.append(self._host_note(object_type, label, name, host, before))
                if host.state == 1 and object_type == "resource":
                    notes.extend(self._failover(label, name, host))
                elif name in self.asked or name in self.said:
                    self.asked.pop(name, None)
                    self.said.pop(name, None)
            for description, service in host.services.items():
                if not (service.checked and service.hard):
                    continue
                key = f"{name};{description}"
                now = [service.state, 1]
                before = self.services.get(key)
                if before != now:
                    changed = True
                    self.services[key] = now
                    if before is not None or service.state != 0:
                        old = "new" if before is None else _service_state(before[0])
                        level = EventLevel.INFO if service.state == 0 else EventLevel.WARNING
                        notes.append(
                            Note(
                                level,
                                object_type,
                                label,
                                f"nagios: {name} {description} {old} -> {service.state_name} (hard): {service.output}",
                            )
                        )
        gone = [n for n in self.hosts if n not in seen]
        for name in gone:
            changed = True
            del self.hosts[name]
        for key in [k for k in self.services if k.split(";", 1)[0] not in seen]:
            changed = True
            del self.services[key]
        if changed:
            self._save()
        return notes

    def _host_note(
        self, object_type: str, label: str, name: str, host: HostStatus, before: list[int] | None
    ) -> Note:
        old = "new" if before is None else f"{_host_state(before[0])}" + ("" if before[1] else " (soft)")
        kind = "hard" if host.hard else f"soft {host.attempt}/{host.max_attempts}"
        level = (
            EventLevel.INFO if host.state == 0 else EventLevel.WARNING if not host.hard else EventLevel.ERROR
        )
        return Note(
            level,
            object_type,
            label,
            f"nagios: host {name} {old} -> {host.state_name} ({kind}): {host.output}",
        )

    def _failover(self, label: str, name: str, host: HostStatus) -> list[Note]:
        if self.asked.get(name) == host.last_check:
            return []
        self.asked[name] = host.last_check
        try:
            member = self._eligible(label)
        except QrmError as exc:
            log.warning("nagios: cannot tell whether %s may fail over: %s", label, exc.message)
            return []
        if member is None:
            return []
        eligible, since = member
        decision = decide(host)
        remark = decision.why
        level = EventLevel.INFO
        if decision.fail and host.last_check and host.last_check < since.timestamp():
            # Nagios's DOWN predates the member's current state (it came back
            # meanwhile, e.g. its heartbeats resumed): ask Nagios to look again now.
            self._recheck(name)
            remark = "no failover yet: Nagios's DOWN is older than the member's current state; asked Nagios to check again"
        elif decision.fail:
            observed = datetime.fromtimestamp(host.last_check, UTC) if host.last_check else None
            try:
                with service_context(self.core, actor=source.ACTOR) as ctx:
                    mark_failed(ctx, label, reason=decision.why, monitor=MONITOR, observed_at=observed)
                remark = f"failover: resource {label} taken for failed ({decision.why})"
                level = EventLevel.WARNING
            except QrmError as exc:
                remark = f"no failover: {exc.message}"
        if self.said.get(name) == remark:
            return []
        self.said[name] = remark
        if decision.fail and remark.startswith("failover:"):
            return []  # core recorded the transition with the reason
        return [Note(level, "resource", label, f"nagios: {eligible}: {remark}")]

    def _recheck(self, name: str) -> None:
        from qrm_nagios.store import ObjectStore

        try:
            control.send(
                ObjectStore(self.settings, self.core).command_file(),
                [control.command("SCHEDULE_FORCED_HOST_CHECK", name, int(time.time()))],
                timeout=5,
            )
        except QrmError as exc:
            log.warning("nagios: could not ask Nagios to check %s again: %s", name, exc.message)

    def _eligible(self, label: str) -> tuple[str, datetime] | None:
        """For an active member of a VE that asked for failover on monitoring: what to
        call it in events, and since when it is in its state (None: not such a member)."""
        with source.reading(self.core) as ctx:
            try:
                resource = show_resource(ctx, label)
            except NotFound:
                return None
            if resource.ve is None:
                return None
            try:
                ve = show_ve(ctx, resource.ve)
            except NotFound:
                return None
        if not (ve.failover and ve.monitor_failover):
            return None
        return f"{label} serves {ve.name}", resource.state_changed_at


def _host_state(code: int) -> str:
    return {0: "UP", 1: "DOWN", 2: "UNREACHABLE"}.get(code, "UNKNOWN")


def _service_state(code: int) -> str:
    return {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}.get(code, "UNKNOWN")


def record(core: Settings, notes: list[Note]) -> None:
    """Record events (one transaction); a failure is logged, never raised."""
    if not notes:
        return
    try:
        from qrm_core.plugin_api import service_context

        with service_context(core, actor=source.ACTOR) as ctx:
            for note in notes:
                ctx.record(note.object_type, note.object_name, note.message, level=note.level)
            ctx.commit()
    except Exception as exc:  # noqa: BLE001 - monitoring must not stop over the event log
        log.error("nagios: could not record %d events: %s", len(notes), exc)


def as_dict(note: Note) -> dict[str, Any]:
    return {
        "level": note.level.value,
        "object": f"{note.object_type}:{note.object_name}",
        "message": note.message,
    }
