"""Running qrm's vcsim for tests and benchmarks: find or build the binary, start one, stop it by PID.

The binary: ``QRM_TEST_VCSIM`` (a vcsim built before, e.g. by CI's first
session), else built once into a cache directory (``QRM_TEST_VCSIM_CACHE``,
else the pytest cache of the checkout, ``.pytest_cache/d/qrm-vmware-vcsim``)
and reused by every later test session of the run. Each simulator listens on
a free loopback port (``-l 127.0.0.1:0``) and is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vcsimbuild as build

MISSING_HINT = (
    "apt-get install golang-go golang-github-vmware-govmomi-dev (scripts/system-packages.sh test); "
    "qrm's tests build vcsim from those sources"
)


def binary(default_cache: Path) -> Path:
    """A vcsim binary: the one QRM_TEST_VCSIM names, or the cached build (built now if needed)."""
    given = os.environ.get("QRM_TEST_VCSIM")
    if given:
        path = Path(given)
        if not os.access(path, os.X_OK):
            raise build.BuildError(f"QRM_TEST_VCSIM={given} is not an executable file")
        return path
    cache = Path(os.environ.get("QRM_TEST_VCSIM_CACHE") or default_cache)
    return build.cached_binary(cache)


@dataclass
class Vcsim:
    """One running simulator."""

    proc: subprocess.Popen[str]
    url: str
    username: str
    password: str
    args: tuple[str, ...]
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 443

    def _request(self, method: str, path: str = "/qrm/soap-calls") -> Any:
        context = ssl._create_unverified_context()  # the test talks to its own simulator
        request = urllib.request.Request(self.url.replace("/sdk", path), method=method)
        with urllib.request.urlopen(request, context=context, timeout=10) as answer:
            body = answer.read()
        return json.loads(body) if body else None

    def soap_calls(self) -> dict[str, Any]:
        """``{"total": N, "methods": {"RetrievePropertiesEx": n, ...}}`` since the last reset."""
        return dict(self._request("GET"))

    def reset_calls(self) -> None:
        self._request("DELETE")

    def task_delay(self, task: str, ms: int) -> None:
        """Tasks of kind ``task`` (``powerOn``, ``createVm``...) run for ``ms`` ms from now on (0: at once)."""
        self._request("POST", f"/qrm/task-delay?task={task}&ms={ms}")

    def fail_next(self, method: str, count: int = 1) -> None:
        """The next ``count`` calls of ``method`` get a SystemError fault from the simulator."""
        self._request("POST", f"/qrm/faults?method={method}&count={count}")

    def connect(self) -> Any:
        """A separate pyVmomi session: vCenter's own view, independent of qrm's."""
        from pyVim.connect import SmartConnect

        return SmartConnect(
            protocol="https",
            host=self.host,
            port=self.port,
            user=self.username,
            pwd=self.password,
            sslContext=ssl._create_unverified_context(),
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start(vcsim: Path, *args: str, timeout: float = 60.0) -> Vcsim:
    """Start ``vcsim ARGS`` on a free loopback port; return once it accepts connections."""
    proc = subprocess.Popen(
        [str(vcsim), "-l", "127.0.0.1:0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready: dict[str, Any] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("QRM_VCSIM ") and not ready:
                ready.update(json.loads(line.split(" ", 1)[1]))

    reader = threading.Thread(target=read, name=f"vcsim-{proc.pid}", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not ready:
        if proc.poll() is not None or time.monotonic() > deadline:
            with suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            raise RuntimeError(f"vcsim {' '.join(args)} did not start: " + " | ".join(lines[-5:]))
        time.sleep(0.02)
    return Vcsim(
        proc=proc,
        url=str(ready["url"]),
        username=str(ready["username"]),
        password=str(ready["password"]),
        args=tuple(args),
        output=lines,
    )


@contextmanager
def running(vcsim: Path, *args: str) -> Iterator[Vcsim]:
    sim = start(vcsim, *args)
    try:
        yield sim
    finally:
        sim.stop()
