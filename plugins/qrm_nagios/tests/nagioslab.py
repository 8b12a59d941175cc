"""Test helpers: network namespaces for Nagios and the machines it checks, and
Nagios's own files read independently of the plugin.

Nagios runs in namespace ``mon``; the machines' addresses live in namespace
``lab``, joined to ``mon`` by a veth pair (10.77.N.0/24, N per test process).
Nothing is added to the root namespace; every check Nagios makes stays inside
the two namespaces. Both are deleted when the test ends.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qrm_core.testing import missing
from qrm_core.testkit import Netns

PLUGINS = Path("/usr/lib/nagios/plugins")


def require_nagios() -> str:
    """The nagios4 program and the monitoring plugins, or skip/fail saying what to install."""
    program = shutil.which("nagios4")
    if program is None or not (PLUGINS / "check_ping").exists():
        missing("Nagios 4", "apt-get install nagios4-core monitoring-plugins-basic")
    assert program is not None
    return program


def require_root() -> None:
    if os.geteuid() != 0:
        missing("root", "network namespaces need root (run the tests as root)")
    if not Path("/run/netns").exists() and shutil.which("ip") is None:
        missing("iproute2", "apt-get install iproute2")


class Lab:
    """``mon`` (where Nagios runs) and ``lab`` (the machines' addresses), joined by a veth pair."""

    def __init__(self) -> None:
        require_root()
        tag = os.getpid() % 200 + 20
        self.prefix = f"10.77.{tag}"
        self.mon = Netns("nm")
        self.lab = Netns("nl")
        try:
            self.mon.ip(
                "link", "add", "mveth", "type", "veth", "peer", "name", "lveth", "netns", self.lab.name
            )
            self.mon.ip("addr", "add", f"{self.prefix}.1/24", "dev", "mveth")
            self.mon.ip("link", "set", "mveth", "up")
            self.lab.ip("link", "set", "lveth", "up")
        except Exception:
            self.delete()
            raise
        self._next = 10

    def address(self) -> str:
        """A new machine address, up in the lab namespace."""
        self._next += 1
        address = f"{self.prefix}.{self._next}"
        self.lab.ip("addr", "add", f"{address}/24", "dev", "lveth")
        return address

    def down(self, address: str) -> None:
        """The machine at ``address`` disappears from the network."""
        self.lab.ip("addr", "del", f"{address}/24", "dev", "lveth")

    def up(self, address: str) -> None:
        self.lab.ip("addr", "add", f"{address}/24", "dev", "lveth")

    def delete(self) -> None:
        self.lab.delete()
        self.mon.delete()


# ---------------------------------------------------------------------------
# Nagios's own files, read without the plugin's code
# ---------------------------------------------------------------------------


def blocks(path: Path, kind: str) -> list[dict[str, str]]:
    """Every ``kind {`` block of status.dat, or every ``define kind {`` of objects.cache."""
    found: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.strip()
        if line in (f"{kind} {{", f"define {kind} {{"):
            current = {}
        elif line == "}" and current is not None:
            found.append(current)
            current = None
        elif current is not None and line:
            if path.suffix == ".dat":  # status.dat: key=value
                key, _, value = line.partition("=")
            else:  # objects.cache: key<tab>value
                parts = re.split(r"\s+", line, maxsplit=1)
                key, value = parts[0], parts[1] if len(parts) > 1 else ""
            current[key] = value
    return found


def hosts_in_status(status: Path) -> dict[str, dict[str, str]]:
    return {b["host_name"]: b for b in blocks(status, "hoststatus")}


def services_in_status(status: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(b["host_name"], b["service_description"]): b for b in blocks(status, "servicestatus")}


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (FileNotFoundError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def send_command(pipe: Path, text: str) -> None:
    """An external command to Nagios, as an administrator would write it."""
    with open(pipe, "w") as handle:
        handle.write(f"[{int(time.time())}] {text}\n")


def _forced(pipe: Path, command: str, find: Callable[[], dict[str, str] | None], what: str) -> dict[str, str]:
    """Send a forced-check command and wait for its result in status.dat.

    Sent once: a second command would be a second check (one more soft
    attempt). A command that arrives while Nagios restarts can be lost, so
    tests wait for Nagios to be quiet (:func:`quiet`) before forcing checks."""
    before = int(time.time())
    send_command(pipe, command.replace("{now}", str(before)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        block = find()
        if block is not None and int(block.get("last_check", "0")) >= before:
            return block
        time.sleep(0.2)
    raise AssertionError(f"timed out after 60 s waiting for {what} (last: {find()!r})")


def force_host_check(pipe: Path, status: Path, host: str) -> dict[str, str]:
    """Make Nagios check ``host`` now; its status block once the result is in status.dat."""
    return _forced(
        pipe,
        f"SCHEDULE_FORCED_HOST_CHECK;{host};{{now}}",
        lambda: hosts_in_status(status).get(host) if status.exists() else None,
        f"a check of {host}",
    )


def force_service_check(pipe: Path, status: Path, host: str, service: str) -> dict[str, str]:
    return _forced(
        pipe,
        f"SCHEDULE_FORCED_SVC_CHECK;{host};{service};{{now}}",
        lambda: services_in_status(status).get((host, service)) if status.exists() else None,
        f"a check of {host}/{service}",
    )


def quiet(cache: Path, seconds: float = 2.0, timeout: float = 30.0) -> None:
    """Wait until Nagios has not reloaded (rewritten its object cache) for ``seconds``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            age = time.time() - cache.stat().st_mtime
        except FileNotFoundError:
            age = 0.0
        if age >= seconds:
            return
        time.sleep(0.2)
    raise AssertionError(f"Nagios kept reloading for {timeout:.0f} s")
