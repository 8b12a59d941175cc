"""Helpers for tests that need network namespaces and the real ``qrm server``:
core's boot-image tests and plugins' boot tests use the same ones.

Everything runs inside network namespaces the tests create (``ip netns``):
addresses live only there, processes started there are tracked by PID and
stopped by PID (or by the process group the test created), and the
namespaces are deleted afterwards.

* :class:`Netns`: a namespace owned by a test; commands and sockets inside it.
* :class:`Udhcpd`: busybox udhcpd serving a pool on one of its interfaces.
* :class:`QrmServerProcess`: the real ``qrm server`` (a subprocess in a
  namespace, on a private SQLite database); tests read and change qrm's state
  through the services on the same database.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
#: iproute2's ip, found once: a test's own PATH may put busybox's ip (no "netns") first.
IP = shutil.which("ip") or "/sbin/ip"
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


def stop_process(proc: subprocess.Popen[Any] | None, *, group: bool = False, timeout: float = 5) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: by PID (or by the process group we created)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(timeout=timeout)


class Netns:
    """A network namespace owned by a test (unique name with the PID)."""

    def __init__(self, tag: str) -> None:
        self.name = f"qrm{tag}{os.getpid()}"[:15]
        run(IP, "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        return run(IP, "-n", self.name, *args).stdout

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen([IP, "netns", "exec", self.name, *args], **kwargs)

    def inside(self, work: Callable[[], T]) -> T:
        """Run ``work`` in a thread that entered the namespace; sockets it makes stay there."""
        result: dict[str, Any] = {}

        def enter_and_run() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
                result["value"] = work()
            except Exception as exc:  # noqa: BLE001 - raised again in the calling thread
                result["error"] = exc

        # The thread's network namespace dies with it; what it made stays where it was made.
        thread = threading.Thread(target=enter_and_run)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        value: T = result["value"]
        return value

    def listen(self, address: str, port: int) -> socket.socket:
        """A TCP socket listening inside this namespace."""

        def create() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(64)
            return sock

        return self.inside(create)

    def can_connect(self, address: str, port: int) -> bool:
        """Whether a TCP connection to ``address:port`` inside the namespace succeeds."""

        def attempt() -> bool:
            try:
                with socket.create_connection((address, port), timeout=1):
                    return True
            except OSError:
                return False

        return self.inside(attempt)

    def delete(self) -> None:
        run(IP, "netns", "del", self.name, check=False)


class Udhcpd:
    """busybox udhcpd serving a pool (and fixed addresses by MAC) on one interface of a namespace."""

    def __init__(
        self,
        netns: Netns,
        interface: str,
        work: Path,
        start: str,
        end: str,
        options: tuple[str, ...] = (),
        static: dict[str, str] | None = None,
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.leases = work / "udhcpd.leases"
        self.leases.touch()
        config = work / "udhcpd.conf"
        lines = [
            f"start {start}",
            f"end {end}",
            f"interface {interface}",
            "max_leases 50",
            f"lease_file {self.leases}",
            f"pidfile {work / 'udhcpd.pid'}",
            "option subnet 255.255.255.0",
            "option lease 600",
            *(f"option {o}" for o in options),
            *(f"static_lease {mac} {ip}" for mac, ip in (static or {}).items()),
        ]
        config.write_text("\n".join(lines) + "\n")
        self.log = open(work / "udhcpd.log", "wb")
        self.proc = netns.popen(
            ["/bin/busybox", "udhcpd", "-f", str(config)], stdout=self.log, stderr=self.log
        )
        time.sleep(0.2)
        if self.proc.poll() is not None:
            raise RuntimeError(f"udhcpd failed: {(work / 'udhcpd.log').read_text()}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def qemu_direct_boot(
    kernel: Path | str,
    initrd: Path | str,
    cmdline: str,
    mac: str,
    *,
    memory_mb: int = 256,
    cpus: int = 2,
    nic: str = "virtio-net-pci",
    tap: str = "tap0",
) -> list[str]:
    """A QEMU (TCG) command line booting ``kernel``/``initrd`` directly (what iPXE would
    be told), serial console on stdout, on a tap interface the test made; with
    ``-no-reboot`` every reboot ends the process, so the next boot can be given the
    then current boot configuration."""
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-m",
        str(memory_mb),
        "-smp",
        str(cpus),
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        "-netdev",
        f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device",
        f"{nic},netdev=n0,mac={mac}",
    ]


class QrmServerProcess:
    """The real ``qrm server`` inside a namespace, on a private SQLite database;
    the plugins installed are found through their entry points, as in production."""

    def __init__(self, netns: Netns, host: str, port: int, work: Path) -> None:
        from qrm_core.config import Settings
        from qrm_core.plugins import PluginSystem
        from qrm_core.services import setup

        self.netns, self.host, self.port = netns, host, port
        self.url = f"http://{host}:{port}"
        data = work / "qrm-data"
        data.mkdir(parents=True, exist_ok=True)
        values = {
            "QRM_DATA_DIR": str(data),
            "QRM_DATABASE_URL": f"sqlite:///{data / 'qrm.db'}",
            "QRM_HEARTBEAT_INTERVAL": "1",
            "QRM_HEARTBEAT_TIMEOUT": "40",
            "QRM_SERVER_URL": self.url,
        }
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("QRM_") or k.startswith("QRM_TEST_")
        }
        self.env.update(values)
        self.settings = Settings(
            data_dir=data,
            database_url=values["QRM_DATABASE_URL"],
            heartbeat_interval=1.0,
            heartbeat_timeout=40.0,
            server_url=self.url,
            actor="tester",
        )
        self.plugins = PluginSystem(self.settings, discover_plugins=False).load()
        # A server listening beyond loopback refuses the default admin password.
        setup.init(self.settings, admin_password="qrm-test-password", plugins=self.plugins)
        self.log_path = work / "qrm-server.log"
        self._log = open(self.log_path, "wb")
        self.proc = netns.popen(
            [
                sys.executable,
                "-c",
                "from qrm_core.cli.main import run; run()",
                "server",
                "--host",
                host,
                "--port",
                str(port),
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not netns.can_connect(host, port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"qrm server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    @contextlib.contextmanager
    def ctx(self) -> Iterator[Any]:
        from qrm_core.services import service_context

        with service_context(self.settings, actor="tester", plugins=self.plugins) as ctx:
            yield ctx

    def enrollment_token(self) -> str:
        from qrm_core.services import site

        with self.ctx() as ctx:
            return site.get_enrollment_token(ctx)

    def resource(self, mac: str) -> Any:
        from sqlmodel import select

        from qrm_core.models import Resource

        with self.ctx() as ctx:
            return ctx.session.exec(select(Resource).where(Resource.mac == mac)).first()

    def wait(self, predicate: Callable[[Any], Any], timeout: float, what: str) -> Any:
        """Poll ``predicate(service context)`` until it is true; its value."""
        deadline = time.monotonic() + timeout
        while True:
            with self.ctx() as ctx:
                value = predicate(ctx)
            if value:
                return value
            self._alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.2)

    def wait_resource(self, mac: str, timeout: float, what: str, predicate: Callable[[Any], bool]) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            row = self.resource(mac)
            if row is not None and predicate(row):
                return row
            self._alive()
            if time.monotonic() > deadline:
                state = None if row is None else (row.state, row.boot_generation)
                raise AssertionError(f"timed out after {timeout} s waiting for {what} (resource: {state})")
            time.sleep(0.2)

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"qrm server died: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        from qrm_core import db

        stop_process(self.proc, group=True, timeout=10)
        self._log.close()
        db.dispose_engines()
