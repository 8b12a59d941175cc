"""Processes and network namespaces the lab owns, tracked so they can be removed later.

A process is recorded as its PID *and* its start time (``/proc/PID/stat``,
field 22): after a crash or a reboot of this machine the PID may belong to
someone else, and the lab must never signal a stranger. Everything the lab
starts runs in a session of its own (``start_new_session``), so closing the
terminal does not stop it, and signalling its process group reaches its
children too.

Network namespaces are named ``qrmlab-<pid>`` and created with ``ip netns
add``; ``ip netns pids`` finds every process still inside one, tracked or
not (a DHCP server whose parent was killed), so :func:`delete_netns` leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qrm_core.errors import DriverError

NETNS_DIR = Path("/run/netns")
#: iproute2's ip, found once (a PATH may put busybox's ip, which has no "netns", first).
IP = shutil.which("ip", path="/usr/sbin:/usr/bin:/sbin:/bin") or shutil.which("ip") or "/sbin/ip"


@dataclass
class Proc:
    """A process the lab started: enough to find it again, and only it."""

    name: str
    pid: int
    start: int
    group: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Proc:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            start=int(data["start"]),
            group=bool(data.get("group", True)),
        )


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of a process, or None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    rest = text[text.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    found = _stat(pid)
    return None if found is None else found[1]


def track(name: str, pid: int, *, group: bool = True) -> Proc:
    start = start_time(pid)
    if start is None:
        raise DriverError(f"{name} (pid {pid}) exited at once")
    return Proc(name=name, pid=pid, start=start, group=group)


def alive(proc: Proc) -> bool:
    """The same process is still there (not reused, not a zombie)."""
    found = _stat(proc.pid)
    return found is not None and found[1] == proc.start and found[0] not in ("Z", "X")


def _signal(proc: Proc, signum: int) -> None:
    if not alive(proc):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if proc.group and os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)


def stop(procs: Iterable[Proc], *, timeout: float = 10.0, reap: Iterable[subprocess.Popen[Any]] = ()) -> None:
    """SIGTERM each live process, wait up to ``timeout``, then SIGKILL what is left."""
    procs = [p for p in procs if alive(p)]
    children = list(reap)
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            child.poll()
        left = [p for p in procs if alive(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for proc in left:
        _signal(proc, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in left) and time.monotonic() < deadline:
        for child in children:
            child.poll()
        time.sleep(0.05)


def kill(proc: Proc, reap: Iterable[subprocess.Popen[Any]] = ()) -> None:
    """SIGKILL at once (a power cut) and wait until it is gone."""
    _signal(proc, signal.SIGKILL)
    children = list(reap)
    deadline = time.monotonic() + 5
    while alive(proc) and time.monotonic() < deadline:
        for child in children:
            child.poll()
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# Network namespaces
# ---------------------------------------------------------------------------


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise DriverError(f"ip {' '.join(args)}: {detail[-1] if detail else f'exit {done.returncode}'}")
    return done


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_pids(name: str) -> list[int]:
    """Every process inside the namespace (``ip netns pids``)."""
    if not netns_exists(name):
        return []
    done = run_ip("netns", "pids", name, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def delete_netns(name: str, *, timeout: float = 10.0) -> None:
    """Stop whatever still runs inside ``name`` (by PID) and delete it."""
    if not netns_exists(name):
        return
    strays = []
    for pid in netns_pids(name):
        start = start_time(pid)
        if start is not None and pid != os.getpid():
            strays.append(Proc(name=f"pid {pid}", pid=pid, start=start, group=False))
    stop(strays, timeout=timeout)
    run_ip("netns", "del", name, check=False)
