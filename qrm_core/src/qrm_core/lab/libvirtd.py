"""A libvirt daemon of one's own: the lab's hypervisor hosts and the tests' libvirt hosts.

Debian's ``libvirtd`` (with the QEMU driver) runs as root, and a root
libvirtd keeps its state in fixed places (``/run/libvirt``,
``/var/lib/libvirt``, ``/etc/libvirt/qemu.conf``...). To run several at once
beside anyone else's, each runs in a **mount namespace of its own** in which
those directories are bind mounts of its private directory (``ip netns exec``
already gives the process a fresh mount namespace; without a network
namespace ``unshare --mount`` does). Its sockets live in that directory too
(``unix_sock_dir``), reachable from outside as
``qemu+unix:///system?socket=<dir>/sock/libvirt-sock``. In a network
namespace, its QEMU guests' taps join that namespace's bridges.

Its ``qemu.conf`` runs QEMU as root without cgroups, security driver or
virtlogd (guests' output goes to files in ``<dir>/log``), and every daemon
gets its own host UUID (libvirt refuses to migrate between two hosts with the
same one), so two of them on one machine are two hosts for live migration.

The daemon is started with ``Popen`` and stopped by its PID; its QEMU
processes first, by the PIDs in its own state directory (``<dir>/run/qemu``):
a stopped libvirtd leaves its guests running otherwise.

**Reaping.** libvirtd daemonizes QEMU: a guest's QEMU is an orphan, and when it
exits libvirt waits (polling ``kill(pid, 0)``) until something reaps its zombie,
which on a host is init at once. Where PID 1 reaps late (this project's
sandboxes: 1.3-1.8 s) every destroy, and every live migration (the source's QEMU
is stopped inside the call), took that much longer. So the daemon runs under a
small reaper (:data:`REAPER`, ``PR_SET_CHILD_SUBREAPER``): it adopts the
daemon's orphans and reaps them at once, passes SIGTERM/SIGINT on to the
daemon, exits with it, and the daemon gets SIGTERM if the reaper dies
(``PR_SET_PDEATHSIG``). :attr:`LibvirtDaemon.pid` is the reaper's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrm_core.errors import DriverError

LIBVIRTD = "/usr/sbin/libvirtd"
PACKAGE = "libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86"
#: The directories a root libvirtd uses, bind-mounted from its private directory.
MOUNTS = (
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)
QEMU_CONF = """\
# Written by qrm (qrm_core.lab.libvirtd): a private libvirtd for the lab or tests.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
"""


#: ``python -c REAPER ARGV...``: runs ARGV as its child, reaping every orphan it adopts (see the module's text).
REAPER = """\
import ctypes, os, signal, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = subprocess.Popen(sys.argv[1:], preexec_fn=lambda: libc.prctl(1, signal.SIGTERM, 0, 0, 0))  # PDEATHSIG
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda number, _frame: child.send_signal(number))
while True:
    try:
        pid, status = os.wait()
    except InterruptedError:
        continue
    except ChildProcessError:
        sys.exit(0)
    if pid == child.pid:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def missing() -> str | None:
    """What is not installed (one line), or None."""
    if not Path(LIBVIRTD).exists():
        return f"libvirtd (apt-get install {PACKAGE})"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 (apt-get install qemu-system-x86)"
    return None


@dataclass
class LibvirtDaemon:
    """A private libvirtd rooted in ``directory``.

    :ivar netns: The network namespace it runs in (its guests' taps join bridges there); None: this one.
    :ivar host_uuid: Its host UUID (distinct per daemon).
    """

    directory: Path
    netns: str | None = None
    host_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    pid: int | None = None
    socket_dir: Path | None = None
    _proc: subprocess.Popen[Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).absolute()
        if self.socket_dir is None:
            sock = self.directory / "sock"
            # A unix socket path has at most 107 bytes: a deep directory gets a short one elsewhere.
            if len(os.fsencode(sock / "libvirt-admin-sock")) > 100:
                sock = Path(tempfile.mkdtemp(prefix="qrm-lvd-"))
            self.socket_dir = sock

    @property
    def socket(self) -> Path:
        assert self.socket_dir is not None
        return self.socket_dir / "libvirt-sock"

    @property
    def uri(self) -> str:
        """How libvirt clients reach it (from any network namespace: it is a unix socket)."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log_file(self) -> Path:
        return self.directory / "libvirtd.log"

    @property
    def qemu_log_dir(self) -> Path:
        """Each guest's QEMU log (``<name>.log``)."""
        return self.directory / "log" / "qemu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "netns": self.netns,
            "host_uuid": self.host_uuid,
            "pid": self.pid,
            "socket_dir": str(self.socket_dir),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LibvirtDaemon:
        return cls(
            directory=Path(data["directory"]),
            netns=data.get("netns"),
            host_uuid=str(data["host_uuid"]),
            pid=data.get("pid"),
            socket_dir=Path(data["socket_dir"]) if data.get("socket_dir") else None,
        )

    # -- start ---------------------------------------------------------------

    def _write_config(self) -> Path:
        for sub, _ in MOUNTS:
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        (self.directory / "run").mkdir(parents=True, exist_ok=True)
        assert self.socket_dir is not None
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        (self.directory / "etc" / "qemu.conf").write_text(QEMU_CONF)
        conf = self.directory / "libvirtd.conf"
        conf.write_text(
            "# Written by qrm (qrm_core.lab.libvirtd).\n"
            f'unix_sock_dir = "{self.socket_dir}"\n'
            'unix_sock_rw_perms = "0700"\n'
            'unix_sock_ro_perms = "0700"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            f'log_outputs = "3:file:{self.log_file}"\n'
        )
        return conf

    def argv(self) -> list[str]:
        conf = self._write_config()
        q = shlex.quote
        steps = [
            "set -e",
            # A private /run: libvirtd's /run/libvirt lives there, nobody else's is touched.
            "mount -t tmpfs -o mode=0755 qrm-libvirtd /run",
            "mkdir -p /run/libvirt",
            f"mount --bind {q(str(self.directory / 'run'))} /run/libvirt",
        ]
        for sub, target in MOUNTS:
            steps.append(f"mkdir -p {q(target)}")
            steps.append(f"mount --bind {q(str(self.directory / sub))} {q(target)}")
        steps.append(f"exec {LIBVIRTD} -f {q(str(conf))} -p {q(str(self.directory / 'libvirtd.pid'))}")
        script = "\n".join(steps)
        reaped = [sys.executable, "-I", "-c", REAPER, "sh", "-c", script]
        if self.netns:
            from qrm_core.lab.procs import IP

            return [IP, "netns", "exec", self.netns, *reaped]
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        return [unshare, "--mount", "--propagation", "private", *reaped]

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until its socket answers; DriverError (one line) if it does not."""
        problem = missing()
        if problem:
            raise DriverError(f"cannot run a libvirt daemon: {problem} is missing")
        argv = self.argv()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        out = open(self.directory / "libvirtd.out", "ab")
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            out.close()
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DriverError(f"libvirtd exited at start: {self._tail()}")
            if self.socket.exists() and self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise DriverError(f"libvirtd did not answer within {timeout:.0f} s: {self._tail()}")

    def _answers(self) -> bool:
        import socket as sockets

        with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def _tail(self) -> str:
        for path in (self.directory / "libvirtd.out", self.log_file):
            with contextlib.suppress(OSError):
                lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
                if lines:
                    return lines[-1].strip()
        return "no output"

    # -- stop ----------------------------------------------------------------

    def guest_pids(self) -> list[int]:
        """The QEMU processes of its running guests (from its own state directory)."""
        found = []
        for pidfile in sorted((self.directory / "run" / "qemu").glob("*.pid")):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                if b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def guest_pid(self, name: str) -> int | None:
        """The QEMU process of the running guest ``name`` (to pull its plug), or None."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.directory / "run" / "qemu" / f"{name}.pid").read_text().strip())
            if b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        return None

    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return stat[stat.rfind(")") + 2] != "Z" and b"libvirtd" in cmdline

    def stop(self, timeout: float = 10.0) -> None:
        """Its guests (SIGKILL: pulled plugs), then the daemon (SIGTERM, SIGKILL after ``timeout``)."""
        for pid in self.guest_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.pid is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=timeout)
        if self.socket_dir is not None and self.socket_dir.parent != self.directory:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
