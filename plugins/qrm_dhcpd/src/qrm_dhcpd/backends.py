"""The two ways qrm keeps a DHCP server in step: full rewrites and single changes.

Full rewrite (``qrm dhcpd sync``, and before the managed server starts):
read every resource, render the whole configuration into a temporary file
beside the real one, check it with the real server (``kea-dhcp4 -t`` /
``dhcpd -t``), and only then rename it over the old file and bring the
running server up to date. A configuration the check rejects changes nothing.

Single change (the resource hooks), by backend:

* Kea with a hosts database: one transaction on one row; Kea is not touched.
* Kea without one: ``config-set`` of the whole configuration over the control
  socket (Kea 2.2 in Debian has no ``host_cmds`` hook). Kea validates the new
  configuration and keeps the old one if it rejects it; the file is written
  only after Kea accepted it. Work grows with the number of resources, so
  changes that arrive while such a rewrite runs share the next one (group
  commit, :mod:`qrm_dhcpd.coalesce`): a burst of registrations costs about
  one rewrite per rewrite duration, not one per change.
* ISC dhcpd: OMAPI deletes and creates the one host object; dhcpd records it
  in its leases file.

When the server is not running, a single change falls back to rewriting the
configuration file (checked), so the next start serves it.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrm_core.plugin_api import InvalidInput, PluginError, QrmError, Settings
from qrm_dhcpd import kea
from qrm_dhcpd.coalesce import RewriteCoordinator, coordinator_for
from qrm_dhcpd.hosts import Host, HostSet, Problem, build_host_set, host_from
from qrm_dhcpd.settings import DhcpdPaths, DhcpdSettings, check_secret, require_configured
from qrm_dhcpd.source import Row, first_owner, resource_rows
from qrm_dhcpd.system import atomic_write, swap, write_temp

log = logging.getLogger("qrm.plugins.dhcpd")


@dataclass
class SyncReport:
    """What a full rewrite did, with the time each step took (seconds)."""

    backend: str
    path: Path
    hosts: int
    problems: list[Problem] = field(default_factory=list)
    applied: str = ""
    check: str = ""
    changed: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "path": str(self.path),
            "reservations": self.hosts,
            "applied": self.applied,
            "check": self.check,
            "problems": [str(p) for p in self.problems],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


@dataclass
class ChangeReport:
    """What one resource change did to the DHCP server."""

    mac: str
    action: str
    how: str
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0


class Backend(ABC):
    """A DHCP server qrm keeps in step; built from the plugin and core settings."""

    name: str

    def __init__(self, settings: DhcpdSettings, core: Settings) -> None:
        self.settings = require_configured(settings)
        self.core = core
        self.paths: DhcpdPaths = settings.paths(core)
        self.pinned_in_pool = True

    # -- reservations ----------------------------------------------------

    def host_set(self, rows: list[Row] | None = None) -> HostSet:
        return build_host_set(
            self.settings,
            rows if rows is not None else resource_rows(self.core),
            pinned_in_pool=self.pinned_in_pool,
        )

    def host(
        self, *, mac: str, ip: str | None, hostname: str | None, resource_id: int | None
    ) -> tuple[Host, list[Problem]]:
        problems: list[Problem] = []
        found = host_from(
            self.settings,
            mac=mac,
            ip=ip,
            hostname=hostname,
            resource_id=resource_id,
            pinned_in_pool=self.pinned_in_pool,
            problems=problems,
        )
        if found is None:
            raise InvalidInput(
                f"cannot reserve {mac!r}: {problems[0].message if problems else 'invalid MAC'}"
            )
        return found, problems

    def upsert_many(
        self, changes: list[tuple[str, str | None, str | None, int | None]]
    ) -> list[ChangeReport | QrmError] | None:
        """Several reservations (mac, ip, hostname, resource id) written together, where
        the backend can (Kea's hosts database on PostgreSQL): a report or the error of
        each, in order. None where it cannot: the caller makes them one by one."""
        return None

    # -- what each backend provides -------------------------------------

    @abstractmethod
    def render_text(self, hosts: HostSet, *, reveal: bool = True) -> str:
        """The configuration file text for these reservations (secrets masked unless ``reveal``)."""

    @abstractmethod
    def full_sync(
        self, *, rows: list[Row] | None = None, apply: bool = True, dry_run: bool = False
    ) -> SyncReport:
        """Rewrite the configuration atomically and bring a running server up to date."""

    @abstractmethod
    def upsert(
        self, *, mac: str, ip: str | None, hostname: str | None, resource_id: int | None
    ) -> ChangeReport:
        """Add or change the reservation of one resource."""

    @abstractmethod
    def remove(self, mac: str) -> ChangeReport:
        """Drop the reservation of one resource."""

    @abstractmethod
    def running(self) -> bool:
        """Whether the server answers on its control channel."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """Facts for ``qrm dhcpd status``."""


# ---------------------------------------------------------------------------
# Kea
# ---------------------------------------------------------------------------


@dataclass
class _Rewrite:
    """What one whole-configuration rewrite did, for every change it covered."""

    how: str
    problems: list[Problem]


class KeaBackend(Backend):
    name = "kea"

    def __init__(self, settings: DhcpdSettings, core: Settings, *, coalesce: bool = True) -> None:
        """``coalesce=False`` gives every change a rewrite of its own (the tests' and benchmark's baseline)."""
        super().__init__(settings, core)
        self.control = kea.KeaControl(self.paths.control_socket, settings.timeout)
        self._db: Any = None
        self.coalesce = coalesce
        #: Shared by every KeaBackend of this process that drives the same Kea.
        self.coordinator: RewriteCoordinator = coordinator_for(
            str(self.paths.config), str(self.paths.control_socket)
        )

    @property
    def hosts_db(self) -> Any:
        """The hosts database, or None when reservations live in the configuration."""
        if self.settings.kea_hosts_database is None:
            return None
        if self._db is None:
            from qrm_dhcpd.keadb import KeaHostsDb

            self._db = KeaHostsDb(
                self.settings.kea_hosts_database.get_secret_value(), self.settings.kea_subnet_id
            )
        return self._db

    def config(self, hosts: HostSet) -> dict[str, Any]:
        return kea.render(self.settings, self.paths, None if self.hosts_db is not None else hosts.hosts)

    def render_text(self, hosts: HostSet, *, reveal: bool = True) -> str:
        config = self.config(hosts)
        return kea.dumps(config if reveal else kea.mask(config))

    def full_sync(
        self, *, rows: list[Row] | None = None, apply: bool = True, dry_run: bool = False
    ) -> SyncReport:
        if dry_run:
            return self._full_sync(rows=rows, apply=apply, dry_run=True)
        # In turn with the changes' rewrites, so an older view never lands after a newer one.
        report, _ = self.coordinator.run(lambda: self._full_sync(rows=rows, apply=apply), share=False)
        return report

    def _full_sync(
        self, *, rows: list[Row] | None = None, apply: bool = True, dry_run: bool = False
    ) -> SyncReport:
        t0 = time.perf_counter()
        hosts = self.host_set(rows)
        t1 = time.perf_counter()
        config = self.config(hosts)
        text = kea.dumps(config)
        t2 = time.perf_counter()
        report = SyncReport(self.name, self.paths.config, len(hosts.hosts), hosts.problems)
        temp = write_temp(self.paths.config, text)
        swapped = False
        try:
            t3 = time.perf_counter()
            result = kea.check(self.settings, self.paths, temp, config)
            t4 = time.perf_counter()
            report.check = result.message + (
                " (checked listening on '*': the interface is not here)" if result.wildcard else ""
            )
            if not result.ok:
                raise PluginError(
                    f"kea-dhcp4 -t rejected the generated configuration, nothing changed: {result.message}"
                )
            report.timings = {"read": t1 - t0, "render": t2 - t1, "write": t3 - t2, "check": t4 - t3}
            if dry_run:
                report.applied = "dry run: nothing changed"
                return report
            old = self.paths.config.read_text() if self.paths.config.exists() else None
            report.changed = old != text
            db = self.hosts_db
            t5 = time.perf_counter()
            applied = []
            if db is not None:
                db.schema_version()
                counts = db.replace_all(hosts.hosts)
                applied.append(
                    f"hosts database: {counts['inserted']} rows inserted, {counts['deleted']} deleted, "
                    f"{counts['kept']} already right"
                )
            t6 = time.perf_counter()
            if apply and (db is None or report.changed) and self.running():
                self.control.config_set(config, tested=not result.wildcard, text=text)
                applied.append("configuration sent to the running Kea (config-set)")
            elif apply and db is None:
                applied.append("Kea is not running: the file takes effect when it starts")
            t7 = time.perf_counter()
            swap(temp, self.paths.config)
            swapped = True
            t8 = time.perf_counter()
            report.timings.update({"hosts_db": t6 - t5, "apply": t7 - t6, "swap": t8 - t7, "total": t8 - t0})
            report.applied = "; ".join(applied) or "file written"
            return report
        finally:
            if not swapped:
                temp.unlink(missing_ok=True)

    def _rewrite(self) -> _Rewrite:
        """Render every reservation, let Kea validate and apply it, then write the file.

        Reads the database when it starts, so it covers every change committed
        before. When Kea is not running, the file is rewritten (checked) instead.
        """
        hosts = self.host_set()
        config = self.config(hosts)
        text = kea.dumps(config)
        try:
            self.control.config_set(config, text=text)
        except kea.KeaUnreachable:
            self._full_sync(apply=False)
            return _Rewrite("Kea is not running: configuration file rewritten", hosts.problems)
        atomic_write(self.paths.config, text)
        return _Rewrite("config-set", hosts.problems)

    def _live_rewrite(self, mac: str, action: str, t0: float) -> ChangeReport:
        """The config-set path of one change: a whole rewrite, shared with the changes arriving meanwhile."""
        done, shared = self.coordinator.run(self._rewrite, share=self.coalesce)
        how = done.how if shared == 1 else f"{done.how} (shared by {shared} changes)"
        problems = [p for p in done.problems if p.mac == mac]
        return ChangeReport(mac, action, how, problems, time.perf_counter() - t0)

    def upsert(
        self, *, mac: str, ip: str | None, hostname: str | None, resource_id: int | None
    ) -> ChangeReport:
        t0 = time.perf_counter()
        host, problems = self.host(mac=mac, ip=ip, hostname=hostname, resource_id=resource_id)
        db = self.hosts_db
        if db is None:
            return self._live_rewrite(host.mac, "reserved", t0)
        problems += db.upsert(host)
        return ChangeReport(host.mac, "reserved", "hosts database", problems, time.perf_counter() - t0)

    def upsert_many(
        self, changes: list[tuple[str, str | None, str | None, int | None]]
    ) -> list[ChangeReport | QrmError] | None:
        db = self.hosts_db
        if db is None or not db.batches:
            return None
        t0 = time.perf_counter()
        results: list[ChangeReport | QrmError] = []
        hosts: list[Host] = []
        for mac, ip, hostname, resource_id in changes:
            try:
                host, problems = self.host(mac=mac, ip=ip, hostname=hostname, resource_id=resource_id)
            except QrmError as exc:
                results.append(exc)
                continue
            hosts.append(host)
            results.append(ChangeReport(host.mac, "reserved", "hosts database", problems))
        written = iter(db.upsert_many(hosts))
        seconds = time.perf_counter() - t0
        for n, result in enumerate(results):
            if isinstance(result, ChangeReport):
                outcome = next(written)
                if isinstance(outcome, QrmError):
                    results[n] = outcome
                else:
                    result.problems += outcome
                    result.seconds = seconds
        return results

    def remove(self, mac: str) -> ChangeReport:
        t0 = time.perf_counter()
        host, _ = self.host(mac=mac, ip=None, hostname=None, resource_id=None)
        db = self.hosts_db
        if db is None:
            return self._live_rewrite(host.mac, "released", t0)
        found = db.remove(host.hex)
        return ChangeReport(
            host.mac, "released" if found else "not reserved", "hosts database", [], time.perf_counter() - t0
        )

    def running(self) -> bool:
        return self.control.alive()

    def status(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "backend": "kea",
            "manage": self.settings.manage,
            "config": str(self.paths.config),
            "config_exists": self.paths.config.exists(),
            "control_socket": str(self.paths.control_socket),
            "running": self.running(),
            "reservations_in": "hosts database" if self.hosts_db is not None else "configuration",
        }
        if self.hosts_db is not None:
            try:
                facts["hosts_db_schema"] = self.hosts_db.schema_version()
                facts["reservations"] = self.hosts_db.count()
            except PluginError as exc:
                facts["hosts_db_error"] = exc.message
        elif facts["running"]:
            answer = self.control.command("config-get")
            subnets = answer.get("arguments", {}).get("Dhcp4", {}).get("subnet4", [])
            facts["reservations"] = sum(len(s.get("reservations", [])) for s in subnets)
        return facts


# ---------------------------------------------------------------------------
# ISC dhcpd
# ---------------------------------------------------------------------------


class IscBackend(Backend):
    name = "isc"

    def __init__(self, settings: DhcpdSettings, core: Settings) -> None:
        super().__init__(settings, core)
        # ISC dhcpd may hand a fixed address inside a range to another client.
        self.pinned_in_pool = False

    def secret(self) -> str:
        """The OMAPI secret: the setting, else the one qrm generated into the state directory."""
        if self.settings.isc_omapi_secret is not None:
            return self.settings.isc_omapi_secret.get_secret_value()
        path = self.paths.omapi_secret
        if path.exists():
            value = path.read_text().strip()
            try:
                check_secret(value)
            except ValueError as exc:
                raise PluginError(f"{path}: {exc}") from None
            return value
        value = base64.b64encode(secrets.token_bytes(32)).decode()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, value + "\n", mode=0o600)
        return value

    def omapi(self) -> Any:
        from qrm_dhcpd.isc import Omapi

        return Omapi(self.settings, self.secret())

    def render_text(self, hosts: HostSet, *, reveal: bool = True) -> str:
        from qrm_dhcpd import isc

        text = isc.render(self.settings, hosts.hosts, self.secret())
        return text if reveal else isc.mask(text)

    def full_sync(
        self, *, rows: list[Row] | None = None, apply: bool = True, dry_run: bool = False
    ) -> SyncReport:
        from qrm_dhcpd import isc

        t0 = time.perf_counter()
        hosts = self.host_set(rows)
        t1 = time.perf_counter()
        text = isc.render(self.settings, hosts.hosts, self.secret())
        t2 = time.perf_counter()
        report = SyncReport(self.name, self.paths.config, len(hosts.hosts), hosts.problems)
        temp = write_temp(self.paths.config, text)
        swapped = False
        try:
            t3 = time.perf_counter()
            ok, message = isc.check(self.settings, temp)
            t4 = time.perf_counter()
            report.check = message
            if not ok:
                raise PluginError(
                    f"dhcpd -t rejected the generated configuration, nothing changed: {message}"
                )
            report.timings = {"read": t1 - t0, "render": t2 - t1, "write": t3 - t2, "check": t4 - t3}
            if dry_run:
                report.applied = "dry run: nothing changed"
                return report
            old = self.paths.config.read_text() if self.paths.config.exists() else ""
            report.changed = old != text
            swap(temp, self.paths.config)
            swapped = True
            t5 = time.perf_counter()
            report.applied = "file written"
            if apply:
                report.applied = self._reconcile(hosts.hosts, isc.config_macs(old))
            t6 = time.perf_counter()
            report.timings.update({"swap": t5 - t4, "apply": t6 - t5, "total": t6 - t0})
            return report
        finally:
            if not swapped:
                temp.unlink(missing_ok=True)

    def _reconcile(self, hosts: list[Host], previous: set[str]) -> str:
        """Bring a running dhcpd's host objects in line with ``hosts`` over OMAPI (one lookup per MAC)."""
        from qrm_dhcpd.isc import OmapiUnreachable

        try:
            omapi = self.omapi()
        except OmapiUnreachable:
            return "dhcpd is not running: the file takes effect when it starts"
        counts = {"added": 0, "replaced": 0, "unchanged": 0, "removed": 0}
        with omapi:
            wanted = {host.mac for host in hosts}
            for host in hosts:
                counts[omapi.upsert(host)] += 1
            for mac in sorted(previous - wanted):
                if omapi.delete(mac):
                    counts["removed"] += 1
        return "running dhcpd updated over OMAPI: " + ", ".join(f"{v} {k}" for k, v in counts.items())

    def _fallback(self, mac: str, action: str, problems: list[Problem], t0: float) -> ChangeReport:
        self.full_sync(apply=False)
        return ChangeReport(
            mac,
            action,
            "dhcpd is not running: configuration file rewritten",
            problems,
            time.perf_counter() - t0,
        )

    def upsert(
        self, *, mac: str, ip: str | None, hostname: str | None, resource_id: int | None
    ) -> ChangeReport:
        from qrm_dhcpd.isc import OmapiUnreachable

        t0 = time.perf_counter()
        host, problems = self.host(mac=mac, ip=ip, hostname=hostname, resource_id=resource_id)
        try:
            omapi = self.omapi()
        except OmapiUnreachable:
            return self._fallback(host.mac, "reserved", problems, t0)
        with omapi:
            if host.ip is not None:
                owner = first_owner(self.core, str(host.ip), host.mac, host.resource_id)
                if owner is not None:
                    problems.append(
                        Problem(
                            host.mac,
                            f"address {host.ip} is already reserved for {owner}; reserved without one",
                        )
                    )
                    host = Host(mac=host.mac, ip=None, hostname=host.hostname, resource_id=host.resource_id)
            how = omapi.upsert(host)
        return ChangeReport(host.mac, "reserved", f"OMAPI ({how})", problems, time.perf_counter() - t0)

    def remove(self, mac: str) -> ChangeReport:
        from qrm_dhcpd.isc import OmapiUnreachable

        t0 = time.perf_counter()
        host, _ = self.host(mac=mac, ip=None, hostname=None, resource_id=None)
        try:
            omapi = self.omapi()
        except OmapiUnreachable:
            return self._fallback(host.mac, "released", [], t0)
        with omapi:
            found = omapi.delete(host.mac)
        return ChangeReport(
            host.mac, "released" if found else "not reserved", "OMAPI", [], time.perf_counter() - t0
        )

    def running(self) -> bool:
        from qrm_dhcpd.isc import OmapiUnreachable

        try:
            self.omapi().close()
        except OmapiUnreachable:
            return False
        return True

    def status(self) -> dict[str, Any]:
        from qrm_dhcpd import isc

        text = self.paths.config.read_text() if self.paths.config.exists() else ""
        return {
            "backend": "isc",
            "manage": self.settings.manage,
            "config": str(self.paths.config),
            "config_exists": bool(text),
            "reservations_in_file": len(isc.config_macs(text)),
            "omapi": f"{self.settings.isc_omapi_host}:{self.settings.isc_omapi_port}",
            "running": self.running(),
        }


def get_backend(settings: DhcpdSettings, core: Settings) -> Backend:
    """The backend the settings name."""
    if settings.backend == "isc":
        return IscBackend(settings, core)
    return KeaBackend(settings, core)


def ensure_state_dir(paths: DhcpdPaths) -> None:
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.state_dir, 0o750)
