"""Test helpers: ``qrm server`` processes (tracked by PID) and simulated agents in a thread."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from qrm_core.lab.simulate import NodeSpec, Simulation
from qrm_core.testkit import free_port  # noqa: F401 - tests import it from here


class ServerProcess:
    """``qrm server`` in its own process, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        exe = Path(sys.executable).parent / "qrm"
        self._out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(exe), "server", "--port", str(self.port)], env=self.env, stdout=self._out, stderr=self._out
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"qrm server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(self.url + "/api/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"qrm server did not come up: {self.log.read_text()[-2000:]}")

    def health(self) -> dict | None:
        try:
            return httpx.get(self.url + "/api/v1/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return None

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_out", None) is not None:
            self._out.close()


def server_env(settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_") or k.startswith("QRM_TEST_")}
    env.update(
        QRM_DATA_DIR=str(settings.data_dir),
        QRM_DATABASE_URL=settings.effective_database_url,
        QRM_ACTOR="tester",
    )
    env.update(extra)
    return env


class SimulationThread:
    """Simulated agents (real HTTP) running in an event loop on their own thread."""

    def __init__(self, url: str, token: str, specs: list[NodeSpec], **kwargs) -> None:
        self.sim = Simulation(url, token, **kwargs)
        self.specs = specs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.sim.run(self.specs))

    def __enter__(self) -> SimulationThread:
        self.thread.start()
        return self

    def call(self, fn, *args) -> None:
        """Run ``fn(sim, *args)`` in the simulation's loop (e.g. power a node off)."""
        done = threading.Event()

        def run() -> None:
            fn(self.sim, *args)
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(10)

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.sim.stopping.set)
        self.thread.join(30)
