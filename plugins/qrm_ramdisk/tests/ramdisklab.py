"""A network namespace with a bridge, busybox udhcpd, the real ``qrm server`` (this plugin
installed, found through its entry points) and a QEMU VM: enough to boot a VE from a
ramdisk volume for real.

Kept apart from core's test helpers on purpose: a plugin's tests run with core and
this plugin only. Every address lives inside the namespace the test creates;
processes are stopped by PID (or by the process group the test created); the
namespace is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qrm_core.testing import missing

CLONE_NEWNET = 0x40000000
IP = shutil.which("ip") or "/sbin/ip"
_libc = ctypes.CDLL(None, use_errno=True)


def stop_process(proc: subprocess.Popen[Any] | None, *, group: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM) if group else proc.terminate()
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        proc.wait(timeout=10)


class Netns:
    def __init__(self, tag: str) -> None:
        self.name = f"qrm{tag}{os.getpid()}"[:15]
        subprocess.run([IP, "netns", "add", self.name], check=True)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> None:
        subprocess.run([IP, "-n", self.name, *args], check=True, capture_output=True)

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen([IP, "netns", "exec", self.name, *args], **kwargs)

    def inside(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` in a thread that entered the namespace (its sockets stay there)."""
        result: dict[str, Any] = {}

        def run() -> None:
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            try:
                result["value"] = work()
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result.get("value")

    def delete(self) -> None:
        subprocess.run([IP, "netns", "del", self.name], check=False)


def http_status(netns: Netns, url: str, source: str) -> int:
    """GET ``url`` from inside the namespace, from address ``source``; the HTTP status."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)

    def get() -> int:
        conn = http.client.HTTPConnection(
            parts.hostname or "", parts.port or 80, timeout=10, source_address=(source, 0)
        )
        try:
            conn.request("GET", parts.path)
            return conn.getresponse().status
        finally:
            conn.close()

    return int(netns.inside(get))


class Udhcpd:
    def __init__(
        self, netns: Netns, interface: str, work: Path, pool: tuple[str, str], static: dict[str, str]
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "leases").touch()
        config = work / "udhcpd.conf"
        lines = [
            f"start {pool[0]}",
            f"end {pool[1]}",
            f"interface {interface}",
            f"lease_file {work / 'leases'}",
            f"pidfile {work / 'udhcpd.pid'}",
            "option subnet 255.255.255.0",
            "option lease 600",
            *(f"static_lease {mac} {ip}" for mac, ip in static.items()),
        ]
        config.write_text("\n".join(lines) + "\n")
        self._log = open(work / "udhcpd.log", "wb")
        self.proc = netns.popen(
            ["/bin/busybox", "udhcpd", "-f", str(config)], stdout=self._log, stderr=self._log
        )

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class QrmServerProcess:
    """``qrm server`` in the namespace on a private SQLite database."""

    def __init__(self, netns: Netns, host: str, port: int, work: Path) -> None:
        from qrm_core.config import Settings
        from qrm_core.plugins import PluginSystem
        from qrm_core.services import setup

        self.url = f"http://{host}:{port}"
        data = work / "qrm-data"
        data.mkdir(parents=True, exist_ok=True)
        database = f"sqlite:///{data / 'qrm.db'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
        env.update(
            QRM_DATA_DIR=str(data),
            QRM_DATABASE_URL=database,
            QRM_HEARTBEAT_INTERVAL="1",
            QRM_SERVER_URL=self.url,
        )
        self.settings = Settings(
            data_dir=data, database_url=database, heartbeat_interval=1.0, server_url=self.url, actor="tester"
        )
        self.plugins = PluginSystem(self.settings, discover_plugins=False).load()
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
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

        def ready() -> bool:
            try:
                socket.create_connection((host, port), timeout=1).close()
                return True
            except OSError:
                return False

        deadline = time.monotonic() + 30
        while not netns.inside(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"qrm server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    @contextlib.contextmanager
    def ctx(self) -> Iterator[Any]:
        from qrm_core.services import service_context

        with service_context(self.settings, actor="tester", plugins=self.plugins) as ctx:
            yield ctx

    def wait(self, predicate: Callable[[Any], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with self.ctx() as ctx:
                value = predicate(ctx)
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"qrm server died: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.2)

    def stop(self) -> None:
        from qrm_core import db

        stop_process(self.proc, group=True)
        self._log.close()
        db.dispose_engines()


def kernel_deb() -> Path:
    """The Debian kernel package ``linux-image-<arch>`` depends on, cached between runs
    in ``${XDG_CACHE_HOME:-~/.cache}/qrm-test/kernel`` (shared with core's boot image tests)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qrm-test" / "kernel"
    cache.mkdir(parents=True, exist_ok=True)
    arch = (
        subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
        or "amd64"
    )
    for attempt in range(2):
        depends = subprocess.run(
            ["apt-cache", "depends", f"linux-image-{arch}"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"Depends: (linux-image-[0-9]\S*)", depends)
        if match:
            break
        if attempt == 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    else:
        missing("a Debian kernel package", "apt-cache cannot resolve linux-image-<arch>; run apt-get update")
    package = match.group(1)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        done = subprocess.run(
            ["apt-get", "download", "-q", package], cwd=cache, capture_output=True, text=True, check=False
        )
        found = sorted(cache.glob(f"{package}_*.deb"))
        if not found:
            missing(
                "a Debian kernel package", f"apt-get download {package} failed: {done.stderr.strip()[-300:]}"
            )
    return found[-1]
