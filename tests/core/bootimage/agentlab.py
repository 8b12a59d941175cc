"""Test helpers for boot images and the node agent: network namespaces, a DHCP
server, the real ``qrm server``, a misbehaving protocol peer, and QEMU.

Everything runs inside network namespaces the tests create (``ip netns``):
addresses live only there, processes started there are tracked by PID and
stopped by PID (or by the process group the test created), and the
namespaces are deleted afterwards.

* Namespaces, udhcpd and the real ``qrm server`` come from
  :mod:`qrm_core.testkit` (shared with the plugins' boot tests).
* :class:`AgentPeer` is a protocol peer that can answer wrongly on purpose
  (malformed JSON, wrong types, unknown commands): the real server never
  does, and the agent must survive a broken or hostile answer. It checks the
  agent's requests strictly against docs/agent-protocol.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# The namespace, DHCP and server helpers are shared with the plugins' tests; the
# tests here import them from this module as before.
from qrm_core.testkit import IP, Netns, QrmServerProcess, Udhcpd, run, stop_process  # noqa: F401


def kill_pidfile(path: Path) -> None:
    """Stop a daemon that wrote its PID to ``path`` (udhcpc forks into the background)."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def applet_dir(base: Path) -> Path:
    """A directory of busybox applet symlinks, so a test agent uses the same tools as the initrd."""
    directory = base / "busybox-bin"
    if not directory.is_dir():
        directory.mkdir(parents=True)
        run("/bin/busybox", "--install", "-s", str(directory))
    return directory


# ---------------------------------------------------------------------------
# The interim protocol peer
# ---------------------------------------------------------------------------

REGISTER_FIELDS: dict[str, tuple[type, ...]] = {
    "mac": (str,),
    "ip": (str, type(None)),
    "cpus": (int,),
    "memory_mb": (int,),
    "hostname": (str, type(None)),
    "hypervisors": (list,),
    "boot_generation": (int,),
    "mode": (str,),
    "ve": (str, type(None)),
    "stage": (str,),
}
REGISTER_REQUIRED = {"mac", "cpus", "memory_mb"}
HEARTBEAT_FIELDS: dict[str, tuple[type, ...]] = {
    "resource_id": (int,),
    "state": (str,),
    "load": (int, float, type(None)),
    "boot_generation": (int,),
}


@dataclass
class PeerResource:
    id: int
    mac: str
    token: str
    facts: dict[str, Any]
    state: str
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


@dataclass
class Request:
    time: float
    method: str
    path: str
    client: str
    status: int
    body: Any = None


class AgentPeer:
    """INTERIM stand-in for ``qrm server``'s ``/agent/v1`` endpoints (see the module docstring)."""

    def __init__(self, enrollment_token: str, heartbeat_interval: float = 1.0) -> None:
        self.enrollment_token = enrollment_token
        self.heartbeat_interval = heartbeat_interval
        self.resources: dict[str, PeerResource] = {}
        self.requests: list[Request] = []
        self.files: dict[str, bytes] = {}
        #: Wrong answers to give, per path, in order: ``(status, body)``; each is used once,
        #: instead of what the protocol would answer.
        self.overrides: dict[str, list[tuple[int, bytes]]] = {}
        self.cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- inspection ------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self.cond.wait(min(left, 0.5))

    def resource(self, mac: str) -> PeerResource | None:
        return self.resources.get(mac)

    def hits(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    # -- serving ---------------------------------------------------------

    def serve(self, sock: socket.socket) -> None:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                peer._get(self)

            def do_POST(self) -> None:
                peer._post(self)

        server = ThreadingHTTPServer(sock.getsockname(), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _send(
        self, handler: BaseHTTPRequestHandler, status: int, body: bytes, kind: str = "application/json"
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _note(self, handler: BaseHTTPRequestHandler, status: int, body: Any = None) -> None:
        with self.cond:
            self.requests.append(
                Request(
                    time.monotonic(), handler.command, handler.path, handler.client_address[0], status, body
                )
            )
            self.cond.notify_all()

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        name = handler.path.split("?", 1)[0].removeprefix("/files/")
        data = self.files.get(name)
        if not handler.path.startswith("/files/") or data is None:
            self._note(handler, 404)
            self._send(handler, 404, b'{"detail": "not found"}')
            return
        self._note(handler, 200)
        self._send(handler, 200, data, "application/octet-stream")

    def _post(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        auth = handler.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if handler.path == "/agent/v1/register":
            status, answer = self._register(token, body)
        elif handler.path == "/agent/v1/heartbeat":
            status, answer = self._heartbeat(token, body)
        else:
            status, answer = 404, {"detail": "not found"}
        self._note(handler, status, body)
        with self.cond:
            queue = self.overrides.get(handler.path)
            override = queue.pop(0) if queue else None
        if override is not None:
            self._send(handler, override[0], override[1])
            return
        self._send(handler, status, json.dumps(answer).encode())

    @staticmethod
    def _check(body: Any, fields: dict[str, tuple[type, ...]], required: set[str]) -> str | None:
        if not isinstance(body, dict):
            return "body is not a JSON object"
        for key, value in body.items():
            if key not in fields:
                return f"unknown field {key}"
            if isinstance(value, bool) or not isinstance(value, fields[key]):
                return f"field {key} has the wrong type"
        missing = required - set(body)
        return f"missing {sorted(missing)}" if missing else None

    def _register(self, token: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        if token != self.enrollment_token:
            return 401, {"detail": "wrong or missing enrollment token"}
        problem = self._check(body, REGISTER_FIELDS, REGISTER_REQUIRED)
        if problem is None and body.get("mode", "idle") not in ("idle", "ve"):
            problem = "mode must be idle or ve"
        if problem is None and body.get("stage", "initrd") not in ("initrd", "ve"):
            problem = "stage must be initrd or ve"
        if problem:
            return 422, {"detail": problem}
        with self.cond:
            mac = body["mac"]
            existing = self.resources.get(mac)
            new_token = os.urandom(16).hex() + "-_.~"
            state = "booting" if body.get("mode") == "ve" else "idle"
            if existing is None:
                existing = PeerResource(len(self.resources) + 1, mac, new_token, dict(body), state)
                self.resources[mac] = existing
            else:
                existing.token, existing.facts, existing.state = new_token, dict(body), state
            return 200, {
                "resource_id": existing.id,
                "token": new_token,
                "heartbeat_interval": self.heartbeat_interval,
                "state": state,
                "boot_generation": body.get("boot_generation", 0),
            }

    def _heartbeat(self, token: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        problem = self._check(body, HEARTBEAT_FIELDS, {"resource_id", "state"})
        if problem is None and body["state"] not in ("idle", "active"):
            problem = "state must be idle or active"
        if problem:
            return 422, {"detail": problem}
        with self.cond:
            match = [r for r in self.resources.values() if r.id == body["resource_id"]]
            if not match or match[0].token != token:
                return 401, {"detail": "wrong token"}
            resource = match[0]
            resource.heartbeats.append(dict(body))
            if body["state"] == "active":
                resource.state = "active"
            command = resource.commands.pop(0) if resource.commands else "none"
            return 200, {
                "command": command,
                "heartbeat_interval": self.heartbeat_interval,
                "boot_generation": body.get("boot_generation", 0),
            }


@contextlib.contextmanager
def peer_in(netns: Netns, address: str, port: int, enrollment_token: str) -> Iterator[AgentPeer]:
    peer = AgentPeer(enrollment_token)
    peer.serve(netns.listen(address, port))
    try:
        yield peer
    finally:
        peer.stop()


class AgentProcess:
    """The agent script run as an ordinary process in a namespace (not PID 1):
    no mounts, no modules; reboot and halt only leave marker files."""

    def __init__(self, netns: Netns, script: Path, run_dir: Path, cmdline: str, applets: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.log_path = run_dir.with_name(run_dir.name + ".log")
        env = {
            "PATH": f"{applets}:/usr/sbin:/usr/bin:/sbin:/bin",
            "QRM_AGENT_CMDLINE": cmdline,
            "QRM_AGENT_RUN": str(run_dir),
            "QRM_AGENT_REBOOT": f"touch {run_dir}/rebooted",
            "QRM_AGENT_HALT": f"touch {run_dir}/halted",
            "TMPDIR": str(run_dir),
        }
        self._log = open(self.log_path, "wb")
        self.proc = netns.popen(
            ["/bin/busybox", "sh", str(script)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if text.count(needle) >= count:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited ({self.proc.returncode}):\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {needle!r}:\n{text[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc, group=True)
        kill_pidfile(self.run_dir / "udhcpc.pid")
        self._log.close()


def memory_mb_like_agent() -> int:
    """What the agent reports for this machine's memory (online memory blocks, else MemTotal)."""
    base = Path("/sys/devices/system/memory")
    try:
        block = int((base / "block_size_bytes").read_text().strip(), 16)
        online = sum(1 for state in base.glob("memory*/state") if state.read_text().strip() == "online")
        if online:
            return block // 1048576 * online
    except (OSError, ValueError):
        pass
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
