"""Shared pieces of the server benchmarks: the machine, child servers started
and stopped by PID, a lean HTTP/1.1 load generator, and statistics.

Why a hand-written HTTP client: the benchmarks measure the server, so the
load generator must cost far less than the server per request. httpx (which
``qrm lab simulate`` uses) spends about as much CPU per request as a small
FastAPI endpoint, and on a two-core machine the two then compete for the
same cores. :class:`Connection` speaks just enough HTTP/1.1 (keep-alive,
``Content-Length`` bodies) for these endpoints; ``bench_register.py
--generator-check`` measures its ceiling against a server that does no work.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on (recorded beside them)."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = int(line.split()[1]) / 1024 / 1024
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = -1.0
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(ram_gb, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_1m_at_start": round(load, 2),
    }


def save_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------
# Child servers, tracked and stopped by PID
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChildServer:
    """A server process of ours: started with Popen, stopped by its PID."""

    def __init__(self, name: str, argv: Sequence[str], port: int, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            list(argv), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                status, _ = asyncio.run(_one_get(self.port, path))
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer {path} within {timeout:.0f} s")

    def cpu_seconds(self) -> float:
        """User+system CPU time the process has used so far (from /proc/<pid>/stat)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # by PID: Popen.send_signal
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


async def _one_get(port: int, path: str) -> tuple[int, bytes]:
    conn = await Connection.open("127.0.0.1", port)
    try:
        return await conn.request("GET", path)
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# A lean HTTP/1.1 keep-alive client
# ---------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.host = host
        self.port = port
        self.reader = reader
        self.writer = writer
        self._host_header = f"Host: {host}:{port}\r\n".encode()
        self.reconnects = 0

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(host, port, reader, writer)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request and read its answer.

        A server closes keep-alive connections idle for a few seconds (uvicorn:
        5 s); a request that finds its connection closed before any answer is
        sent again once on a new connection.
        """
        try:
            return await self._request(method, path, body, headers)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                raise
            self.writer.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
            self.reconnects += 1
            return await self._request(method, path, body, headers)

    async def _request(
        self, method: str, path: str, body: Any, headers: dict[str, str] | None
    ) -> tuple[int, bytes]:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        for field_name, field_value in (headers or {}).items():
            head.append(f"{field_name}: {field_value}\r\n".encode())
        if body is not None:
            head.append(b"Content-Type: application/json\r\n")
        head.append(f"Content-Length: {len(payload)}\r\n\r\n".encode())
        self.writer.write(b"".join(head) + payload)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = -1
        for header in lines[1:]:
            key, _, value = header.partition(b":")
            name = key.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                raise RuntimeError("chunked responses are not supported by this client")
        if length < 0:
            raise RuntimeError(f"{method} {path}: response without Content-Length")
        data = await self.reader.readexactly(length)
        return status, data

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------
# A server that does nothing (the load generator's own ceiling)
# ---------------------------------------------------------------------------

_NULL_BODY = b'{"resource_id":1,"token":"x","heartbeat_interval":10.0,"state":"idle","boot_generation":0}'
_NULL_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(_NULL_BODY)).encode()
    + b"\r\n\r\n"
    + _NULL_BODY
)


class _NullProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            marker = head.find(b"content-length:")
            if marker >= 0:
                length = int(head[marker + 15 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(_NULL_RESPONSE)


def run_null_server(port: int) -> None:
    """Answer every request with a fixed registration answer, doing no work."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_NullProtocol, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def python() -> str:
    return sys.executable
