"""The DHCP server run by ``qrm server`` itself (``QRM_DHCPD_MANAGE=true``).

Start: rewrite the configuration from the database (checked), then start the
real server in the foreground as a child process (inside
``QRM_DHCPD_NETNS`` if set) and wait until it answers on its control channel
(Kea's socket, dhcpd's OMAPI). Stop: SIGTERM to that process by its PID,
SIGKILL if it has not gone after the timeout. Nothing is ever stopped by name.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

from qrm_core.plugin_api import PluginError, Settings, check_listen
from qrm_dhcpd import kea
from qrm_dhcpd.backends import Backend, IscBackend, ensure_state_dir, get_backend
from qrm_dhcpd.settings import DhcpdSettings
from qrm_dhcpd.system import atomic_write, check_netns, netns_prefix, tail

log = logging.getLogger("qrm.plugins.dhcpd")


class ManagedDhcpServer:
    """A Kea or ISC dhcpd process owned by this qrm server."""

    def __init__(self, settings: DhcpdSettings, core: Settings) -> None:
        self.settings = settings
        self.core = core
        self.backend: Backend = get_backend(settings, core)
        self.name = f"dhcpd ({self.backend.name})"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _argv(self) -> list[str]:
        s, p = self.settings, self.backend.paths
        prefix = netns_prefix(s.netns)
        if isinstance(self.backend, IscBackend):
            assert s.interface is not None
            return [
                *prefix,
                s.dhcpd,
                "-f",
                "-d",
                "-4",
                "-cf",
                str(p.config),
                "-lf",
                str(p.leases),
                "-pf",
                str(p.pid),
                s.interface,
            ]
        return [*prefix, s.kea_dhcp4, "-c", str(p.config)]

    def _prepare_isc(self) -> None:
        from qrm_dhcpd.isc import drop_host_records

        paths = self.backend.paths
        if paths.pid.exists():
            try:
                old = int(paths.pid.read_text().strip() or "0")
            except ValueError:
                old = 0
            if old > 0 and _is_running(old, "dhcpd"):
                raise PluginError(
                    f"a dhcpd (pid {old}) already uses {paths.pid}; stop it or set QRM_DHCPD_PID_PATH"
                )
            paths.pid.unlink(missing_ok=True)
        if not paths.leases.exists():
            paths.leases.touch()
            return
        compacted = drop_host_records(paths.leases.read_text(errors="surrogateescape"))
        if compacted is None:
            log.warning("dhcpd: could not parse %s; host records in it were kept", paths.leases)
            return
        text, dropped = compacted
        if dropped:
            atomic_write(paths.leases, text.encode(errors="surrogateescape"))
            log.info(
                "dhcpd: dropped %d host records from %s (the new configuration holds them)",
                dropped,
                paths.leases,
            )

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        assert self.settings.interface is not None  # a configured plugin has one
        # Core's one rule for every listener: DHCP answers on the interface the
        # admin named, and only once the admin password is changed.
        check_listen(self.core, self.settings.interface, service="dhcpd")
        check_netns(self.settings.netns)
        paths = self.backend.paths
        ensure_state_dir(paths)
        if self.backend.running():
            raise PluginError(
                f"a {self.backend.name} DHCP server already answers on its control channel; "
                "stop it, or set QRM_DHCPD_MANAGE=false to drive it instead"
            )
        report = self.backend.full_sync(apply=False)
        for problem in report.problems:
            log.warning("dhcpd: %s", problem)
        env = kea.kea_env(paths) if self.backend.name == "kea" else dict(os.environ)
        if isinstance(self.backend, IscBackend):
            self._prepare_isc()
        self._log = open(paths.log, "ab")
        argv = self._argv()
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError:
            self._close_log()
            raise PluginError(f"{argv[0]} is not installed") from None
        deadline = time.monotonic() + self.settings.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                self._close_log()
                raise PluginError(f"{self.name} exited at start (status {code}): {tail(paths.log)}")
            if self.backend.running():
                log.info("dhcpd: %s started (pid %d) with %d reservations", self.name, self.pid, report.hosts)
                return
            time.sleep(0.05)
        self.stop()
        raise PluginError(
            f"{self.name} did not answer within {self.settings.timeout:.0f} s: {tail(paths.log)}"
        )

    def stop(self) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.settings.timeout)
            except subprocess.TimeoutExpired:
                log.warning("dhcpd: %s (pid %d) ignored SIGTERM; killing it", self.name, proc.pid)
                proc.kill()
                proc.wait(timeout=5)
        self.process = None
        self._close_log()
        if isinstance(self.backend, IscBackend):
            self.backend.paths.pid.unlink(missing_ok=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _is_running(pid: int, name: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return name.encode() in cmdline
