#!/usr/bin/env python3
"""Registrations and heartbeats: ``qrm server`` beside a bare FastAPI + SQLite endpoint.

Each repetition starts, on 127.0.0.1 with fresh data directories:

* a real ``qrm server`` process (embedded SQLite, engine running, no plugins
  beyond what the virtualenv has installed), and
* ``bare_app.py``: the same uvicorn/FastAPI/pydantic stack doing one INSERT
  per registration and one UPDATE per heartbeat (the stack's own limit),

and drives both with the same load generator: N distinct agents register
(``POST /agent/v1/register``, the body ``qrm lab simulate`` sends), then all
of them heartbeat (``POST /agent/v1/heartbeat`` with their per-resource
tokens) for a while. The qrm server runs with ``QRM_HEARTBEAT_TIMEOUT=3600``
(``--heartbeat-timeout``): these agents register first and heartbeat later,
and with the default 35 s the engine would put thousands of them in error
mid-run. Requests are closed-loop over ``--concurrency``
keep-alive connections per server. The two servers take turns in short
slices (``--chunk`` registrations, ``--slice`` seconds of heartbeats), so
load from elsewhere on a shared machine falls on both alike. Reported:
registrations/s, heartbeats/s, latencies, the server's CPU time per request,
and qrm's rate as a fraction of the bare endpoint's in the same repetition;
medians over the repetitions.

``--generator-check`` first measures the load generator alone against a
server that does no work (and httpx, the client ``qrm lab simulate`` uses,
for comparison), to show the generator is not what limits the figures.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/server/bench_register.py                      # N=10000, 5 repetitions
    .venv/bin/python bench/server/bench_register.py -n 2000 --repeat 1   # quick look

Results: a Markdown table on stdout, JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ChildServer,
    Connection,
    free_port,
    machine,
    median,
    percentile,
    save_results,
)

from qrm_core.lab.simulate import ip_for, mac_for

HERE = Path(__file__).resolve().parent
BARE_TOKEN = "bench-enrollment-token"


@dataclass
class Phase:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.rate, 1),
            "p50_ms": round(percentile(self.latencies, 50) * 1000, 2),
            "p95_ms": round(percentile(self.latencies, 95) * 1000, 2),
            "p99_ms": round(percentile(self.latencies, 99) * 1000, 2),
            "server_cpu_s": round(self.server_cpu, 2),
            "server_cpu_ms_per_request": round(self.server_cpu * 1000 / max(self.requests, 1), 3),
        }


def register_body(index: int) -> dict[str, Any]:
    """What a simulated idle machine sends (qrm_core.lab.simulate.SimulatedNode._boot)."""
    return {
        "mac": mac_for(index),
        "ip": ip_for(index),
        "cpus": 2,
        "memory_mb": 2048,
        "hypervisors": [],
        "boot_generation": 0,
        "mode": "idle",
        "ve": None,
    }


class Driver:
    """Agents of one server: keep-alive connections, who registered, their tokens."""

    def __init__(self, name: str, server: ChildServer | None, port: int, enrollment: str, n: int) -> None:
        self.name = name
        self.server = server
        self.port = port
        self.enroll_header = {"Authorization": f"Bearer {enrollment}"}
        self.n = n
        self.conns: list[Connection] = []
        self.agents: list[tuple[int, str]] = []
        self.next_index = 1
        self.position = 0
        self.reg = Phase()
        self.beat = Phase()

    async def open(self, concurrency: int) -> None:
        self.conns = [await Connection.open("127.0.0.1", self.port) for _ in range(concurrency)]

    def close(self) -> None:
        for conn in self.conns:
            conn.close()

    def _cpu(self) -> float:
        return self.server.cpu_seconds() if self.server else 0.0

    @property
    def registered_all(self) -> bool:
        return self.next_index > self.n

    async def register_chunk(self, count: int) -> None:
        """Register the next ``count`` agents (closed loop over all connections)."""
        last = min(self.n, self.next_index + count - 1)
        indexes = iter(range(self.next_index, last + 1))
        self.next_index = last + 1
        reg = self.reg

        async def worker(conn: Connection) -> None:
            for index in indexes:
                started = time.perf_counter()
                status, data = await conn.request(
                    "POST", "/agent/v1/register", register_body(index), self.enroll_header
                )
                reg.latencies.append(time.perf_counter() - started)
                if status != 200:
                    reg.errors += 1
                    continue
                reg.requests += 1
                answer = _json(data)
                self.agents.append((answer["resource_id"], answer["token"]))

        cpu0, t0 = self._cpu(), time.perf_counter()
        await asyncio.gather(*(worker(c) for c in self.conns))
        reg.seconds += time.perf_counter() - t0
        reg.server_cpu += self._cpu() - cpu0

    async def heartbeat_window(self, seconds: float) -> None:
        """Every connection heartbeats for ``seconds``, cycling through all agents."""
        if not self.agents:
            return
        beat = self.beat
        deadline = time.perf_counter() + seconds

        async def worker(conn: Connection) -> None:
            while time.perf_counter() < deadline:
                rid, token = self.agents[self.position % len(self.agents)]
                self.position += 1
                body = {
                    "resource_id": rid,
                    "state": "idle",
                    "load": round(random.random(), 2),
                    "boot_generation": 0,
                }
                started = time.perf_counter()
                status, _ = await conn.request(
                    "POST", "/agent/v1/heartbeat", body, {"Authorization": f"Bearer {token}"}
                )
                beat.latencies.append(time.perf_counter() - started)
                if status != 200:
                    beat.errors += 1
                else:
                    beat.requests += 1

        cpu0, t0 = self._cpu(), time.perf_counter()
        await asyncio.gather(*(worker(c) for c in self.conns))
        beat.seconds += time.perf_counter() - t0
        beat.server_cpu += self._cpu() - cpu0


async def drive(drivers: list[Driver], args: argparse.Namespace) -> None:
    """Register everyone, then heartbeat; the servers take turns in short slices,
    so a burst of load from elsewhere on the machine hits both alike."""
    for driver in drivers:
        await driver.open(args.concurrency)
    turn = 0
    while not all(d.registered_all for d in drivers):
        for driver in drivers if turn % 2 == 0 else reversed(drivers):
            if not driver.registered_all:
                await driver.register_chunk(args.chunk)
        turn += 1
    slices = max(1, round(args.heartbeat_seconds / args.slice))
    for turn in range(slices):
        for driver in drivers if turn % 2 == 0 else reversed(drivers):
            await driver.heartbeat_window(args.heartbeat_seconds / slices)
    for driver in drivers:
        driver.close()


def _json(data: bytes) -> Any:
    import json

    return json.loads(data)


# ---------------------------------------------------------------------------
# The two servers
# ---------------------------------------------------------------------------


def clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
    env["QRM_DATA_DIR"] = str(data_dir)
    return env


ADMIN_PASSWORD = "bench-Admin-Password-7"


def start_qrm(workdir: Path, heartbeat_timeout: float, config_env: dict[str, str], name: str) -> ChildServer:
    port = free_port()
    data = workdir / f"{name}-data"
    qrm = Path(sys.executable).parent / "qrm"
    env = clean_env(data)
    # The agents here register first and heartbeat later (and then each only
    # every N / rate seconds): with the default 35 s timeout the engine would
    # put thousands of them in error mid-run and that work would be measured.
    env["QRM_HEARTBEAT_TIMEOUT"] = str(heartbeat_timeout)
    env.update(config_env)
    # A managed DHCP server starts only once the admin has a password of their own.
    subprocess.run(
        [str(qrm), "init", "--admin-password", ADMIN_PASSWORD], env=env, check=True, capture_output=True
    )
    server = ChildServer(
        f"qrm server ({name})",
        [str(qrm), "server", "--host", "127.0.0.1", "--port", str(port)],
        port,
        env,
        workdir / f"{name}-server.out",
    )
    server.wait_ready("/api/v1/health", timeout=120)
    return server


# ---------------------------------------------------------------------------
# Configurations of the qrm server
# ---------------------------------------------------------------------------

CONFIGS = ("installed", "core", "kea", "kea-config")
#: The agents' addresses (qrm_core.lab.simulate.ip_for) are in 198.18.0.0/15;
#: the DHCP server of the kea configurations serves that subnet in a namespace.
KEA_SUBNET = "198.18.0.0/15"
KEA_SERVER = "198.19.255.254"


def plugin_names() -> list[str]:
    """The plugins installed in this environment outside qrm-core."""
    from qrm_core.plugins import CORE_DISTRIBUTION, PLUGIN_GROUP, installed_entry_points

    return sorted(
        r.name
        for r in installed_entry_points(PLUGIN_GROUP)
        if r.distribution not in (None, CORE_DISTRIBUTION)
    )


class KeaSite:
    """What the kea configurations need, made once per run and always removed:
    a network namespace whose veth end carries the DHCP subnet (the managed
    Kea listens there, nothing leaves it), and for ``kea`` a PostgreSQL
    database with Kea's schema for its hosts (``kea-admin db-init``)."""

    def __init__(self, configs: list[str]) -> None:
        self.netns: Any = None
        self.peer: Any = None
        self.interface = f"qrb{os.getpid() % 100000}S"
        self.database: str | None = None
        self.admin: Any = None
        self.socket_dir = Path(tempfile.mkdtemp(prefix="qrb"))
        if not any(c.startswith("kea") for c in configs):
            return
        if os.geteuid() != 0:
            raise SystemExit("the kea configurations need root (a network namespace and Kea)")
        from qrm_core.testkit import Netns

        self.netns = Netns("rgs")
        self.peer = Netns("rgc")
        self.netns.ip(
            "link", "add", self.interface, "type", "veth", "peer", "name", self.interface[:-1] + "C",
            "netns", self.peer.name,
        )  # fmt: skip
        self.netns.ip("addr", "add", f"{KEA_SERVER}/15", "dev", self.interface)
        self.netns.ip("link", "set", self.interface, "up")
        if "kea" in configs:
            import sqlalchemy as sa

            from qrm_dhcpd.keadb import db_init

            admin_url = os.environ.get(
                "QRM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
            )
            self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
            name = f"qrm_bench_kea_{os.getpid()}"
            with self.admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            self.database = name
            user = sa.engine.make_url(admin_url).username or "postgres"
            host = sa.engine.make_url(admin_url).host or "127.0.0.1"
            port = sa.engine.make_url(admin_url).port or 5432
            self.hosts_url = f"postgresql://{user}@{host}:{port}/{name}"
            db_init(self.hosts_url, "kea-admin")

    def env(self, config: str, name: str) -> dict[str, str]:
        if config == "installed":
            return {}
        if config == "core":
            return {"QRM_DISABLE_PLUGINS": ",".join(plugin_names())}
        env = {
            "QRM_DHCPD_BACKEND": "kea",
            "QRM_DHCPD_MANAGE": "true",
            "QRM_DHCPD_NETNS": self.netns.name,
            "QRM_DHCPD_INTERFACE": self.interface,
            "QRM_DHCPD_SUBNET": KEA_SUBNET,
            "QRM_DHCPD_POOL_START": "198.19.255.100",
            "QRM_DHCPD_POOL_END": "198.19.255.200",
            "QRM_DHCPD_ROUTER": KEA_SERVER,
            "QRM_DHCPD_NEXT_SERVER": KEA_SERVER,
            "QRM_DHCPD_KEA_CONTROL_SOCKET": str(self.socket_dir / f"{name}.sock"),
            "QRM_DHCPD_TIMEOUT": "60",
        }
        if config == "kea":
            env["QRM_DHCPD_KEA_HOSTS_DATABASE"] = self.hosts_url
        return env

    def clear_hosts(self) -> None:
        """A fresh repetition registers the same MACs again: Kea's hosts table starts empty."""
        if self.database is None:
            return
        import sqlalchemy as sa

        url = sa.engine.make_url(self.admin.url).set(database=self.database)
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql("DELETE FROM hosts")
        finally:
            engine.dispose()

    def close(self) -> None:
        if self.admin is not None and self.database is not None:
            with self.admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            self.admin.dispose()
        for ns in (self.netns, self.peer):
            if ns is not None:
                ns.delete()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def qrm_enrollment_token(server: ChildServer) -> str:
    import base64

    async def fetch() -> str:
        conn = await Connection.open("127.0.0.1", server.port)
        try:
            auth = base64.b64encode(f"qrm:{ADMIN_PASSWORD}".encode()).decode()
            status, data = await conn.request(
                "GET", "/api/v1/site/enrollment-token", headers={"Authorization": f"Basic {auth}"}
            )
        finally:
            conn.close()
        if status != 200:
            raise RuntimeError(f"enrollment token: {status} {data[:200]!r}")
        return str(_json(data)["token"])

    return asyncio.run(fetch())


def start_bare(workdir: Path) -> ChildServer:
    port = free_port()
    server = ChildServer(
        "bare FastAPI + SQLite",
        [
            sys.executable,
            str(HERE / "bare_app.py"),
            "--port",
            str(port),
            "--db",
            str(workdir / "bare.db"),
            "--enroll",
            BARE_TOKEN,
        ],
        port,
        clean_env(workdir / "bare-data"),
        workdir / "bare-server.out",
    )
    server.wait_ready("/health")
    return server


def run_once(kinds: list[str], args: argparse.Namespace, site: KeaSite) -> dict[str, Any]:
    """Start the servers (fresh data directories), drive them in turns, stop them."""
    workdir = Path(tempfile.mkdtemp(prefix=f"qrm-bench-register-{os.getpid()}-"))
    servers: dict[str, ChildServer] = {}
    site.clear_hosts()
    try:
        drivers = []
        for kind in kinds:
            if kind.startswith("qrm"):
                config = kind.partition(":")[2] or "installed"
                name = kind.replace(":", "-")
                servers[kind] = start_qrm(workdir, args.heartbeat_timeout, site.env(config, name), name)
                token = qrm_enrollment_token(servers[kind])
            else:
                servers[kind] = start_bare(workdir)
                token = BARE_TOKEN
            drivers.append(Driver(kind, servers[kind], servers[kind].port, token, args.n))
        idle_cpu0 = {k: s.cpu_seconds() for k, s in servers.items()}
        t0 = time.perf_counter()
        asyncio.run(drive(drivers, args))
        wall = time.perf_counter() - t0
        result: dict[str, Any] = {}
        for driver in drivers:
            server = servers[driver.name]
            busy = driver.reg.server_cpu + driver.beat.server_cpu
            idle_seconds = wall - driver.reg.seconds - driver.beat.seconds
            result[driver.name] = {
                "registrations": driver.reg.summary(),
                "heartbeats": driver.beat.summary(),
                # CPU the server used while the other one was being driven (engine thread, ...).
                "idle_cpu_percent": round(
                    100 * (server.cpu_seconds() - idle_cpu0[driver.name] - busy) / idle_seconds, 1
                )
                if idle_seconds > 1
                else None,
            }
        return result
    finally:
        for server in servers.values():
            server.stop()
        if args.keep:
            print(f"  kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------
# The generator's own ceiling
# ---------------------------------------------------------------------------


async def _httpx_rate(port: int, requests: int, concurrency: int) -> float:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
        sem = asyncio.Semaphore(concurrency)
        counter = iter(range(requests))

        async def worker() -> None:
            for index in counter:
                async with sem:
                    response = await client.post(
                        "/agent/v1/register",
                        json=register_body(index + 1),
                        headers={"Authorization": "Bearer x"},
                    )
                    response.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - t0)


def generator_check(args: argparse.Namespace) -> dict[str, Any]:
    """Requests/s and client CPU per request against a server that does no work:
    the lean client at ``--concurrency`` connections, and httpx (what
    ``qrm lab simulate`` uses) at 10 and at ``--concurrency`` connections."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix=f"qrm-bench-null-{os.getpid()}-"))
    null = ChildServer(
        "null server",
        [sys.executable, str(HERE / "bench_register.py"), "_null", str(port)],
        port,
        dict(os.environ),
        workdir / "null.out",
    )
    measured: dict[str, list[tuple[float, float]]] = {}
    try:
        null.wait_ready("/health")
        for _ in range(3):
            driver = Driver("null", None, port, "x", args.n)

            async def register_all(driver: Driver = driver) -> None:
                await driver.open(args.concurrency)
                await driver.register_chunk(args.n)
                driver.close()

            cpu = time.process_time()
            asyncio.run(register_all())
            measured.setdefault(f"lean client, {args.concurrency} connections", []).append(
                (driver.reg.rate, (time.process_time() - cpu) / args.n)
            )
            for conc in (10, args.concurrency):
                count = min(args.n, 3000)
                cpu = time.process_time()
                rate = asyncio.run(_httpx_rate(port, count, conc))
                measured.setdefault(f"httpx, {conc} connections", []).append(
                    (rate, (time.process_time() - cpu) / count)
                )
    finally:
        null.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        name: {
            "per_second": round(median([r for r, _ in runs]), 1),
            "client_cpu_ms_per_request": round(median([c for _, c in runs]) * 1000, 3),
        }
        for name, runs in measured.items()
    }


# ---------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_null":
        from _common import run_null_server

        run_null_server(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10000, help="distinct agents (default 10000)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions; medians are reported")
    parser.add_argument("--concurrency", type=int, default=100, help="keep-alive connections (default 100)")
    parser.add_argument(
        "--heartbeat-seconds", type=float, default=10.0, help="heartbeat phase length (default 10)"
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=500,
        help="registrations per turn before the other server's (default 500)",
    )
    parser.add_argument("--slice", type=float, default=2.0, help="seconds of heartbeats per turn (default 2)")
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=3600.0,
        help="QRM_HEARTBEAT_TIMEOUT of the qrm server (default 3600: no agent times out mid-run)",
    )
    parser.add_argument("--only", choices=["qrm", "bare"], help="run one server only")
    parser.add_argument(
        "--configs",
        default="installed",
        help="qrm servers to run beside the bare endpoint, comma-separated (default: installed): "
        "installed = every plugin this environment has; core = the same with every plugin "
        "disabled (QRM_DISABLE_PLUGINS: not imported, as if not installed); kea = installed, with "
        "qrm-dhcpd managing a Kea 2.2 in a network namespace, its reservations in a hosts database "
        "on PostgreSQL (QRM_TEST_POSTGRES_URL); kea-config = the same with reservations in Kea's "
        "configuration (a rewrite per change, group commit). The kea ones need root.",
    )
    parser.add_argument(
        "--generator-check", action="store_true", help="measure the load generator alone first"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directories (logs, databases)")
    args = parser.parse_args()

    info = machine()
    print(f"# machine: {info}", file=sys.stderr)
    result: dict[str, Any] = {
        "benchmark": "server-register",
        "machine": info,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": {k: v for k, v in vars(args).items() if k != "keep"},
        "runs": [],
    }
    if args.generator_check:
        result["generator"] = generator_check(args)
        print(f"# generator alone: {result['generator']}", file=sys.stderr)

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r} (one of {', '.join(CONFIGS)})")
    qrm_kinds = ["qrm" if c == "installed" else f"qrm:{c}" for c in configs]
    kinds = ["bare"] if args.only == "bare" else qrm_kinds if args.only == "qrm" else [*qrm_kinds, "bare"]
    result["plugins_installed"] = plugin_names()
    # 'installed' means every plugin of this environment, whatever installed it
    # (docs/example-plugin included): say which, the figures depend on it.
    print(f"# plugins installed: {', '.join(result['plugins_installed']) or 'none'}", file=sys.stderr)
    site = KeaSite(configs)
    try:
        _repeat(kinds, args, site, result)
    finally:
        site.close()
    report(kinds, result)


def _repeat(kinds: list[str], args: argparse.Namespace, site: KeaSite, result: dict[str, Any]) -> None:
    for rep in range(args.repeat):
        run = run_once(kinds if rep % 2 == 0 else list(reversed(kinds)), args, site)
        for kind in kinds:
            r, h = run[kind]["registrations"], run[kind]["heartbeats"]
            print(
                f"# rep {rep + 1}/{args.repeat} {kind:4}: register {r['per_second']:8.1f}/s "
                f"(p95 {r['p95_ms']} ms, {r['server_cpu_ms_per_request']} ms CPU, {r['errors']} errors)  "
                f"heartbeat {h['per_second']:8.1f}/s (p95 {h['p95_ms']} ms, "
                f"{h['server_cpu_ms_per_request']} ms CPU, {h['errors']} errors)  "
                f"idle CPU {run[kind]['idle_cpu_percent']}%",
                file=sys.stderr,
            )
        if "bare" in kinds:
            run["ratio"] = {
                kind: {
                    phase: round(run[kind][phase]["per_second"] / run["bare"][phase]["per_second"], 3)
                    for phase in ("registrations", "heartbeats")
                    if run["bare"][phase]["per_second"]
                }
                for kind in kinds
                if kind != "bare"
            }
            print(f"# rep {rep + 1}/{args.repeat} qrm/bare: {run['ratio']}", file=sys.stderr)
        result["runs"].append(run)


def report(kinds: list[str], result: dict[str, Any]) -> None:
    args = argparse.Namespace(**result["params"])

    def med(kind: str, phase: str, key: str) -> float:
        return median([r[kind][phase][key] for r in result["runs"] if kind in r])

    summary: dict[str, Any] = {}
    for kind in kinds:
        summary[kind] = {
            phase: {
                key: med(kind, phase, key)
                for key in ("per_second", "p50_ms", "p95_ms", "server_cpu_ms_per_request")
            }
            for phase in ("registrations", "heartbeats")
        }
    if "bare" in kinds:
        summary["ratio"] = {
            kind: {
                phase: median([r["ratio"][kind][phase] for r in result["runs"] if phase in r["ratio"][kind]])
                for phase in ("registrations", "heartbeats")
            }
            for kind in kinds
            if kind != "bare"
        }
    result["summary"] = summary
    path = save_results("server-register", result)

    print(f"\nN={args.n} agents, {args.concurrency} connections, {args.repeat} repetition(s), medians")
    print(f"plugins installed: {', '.join(result.get('plugins_installed', [])) or 'none'}\n")
    print(
        "| server | registrations/s | p95 ms | server CPU ms/req | heartbeats/s | p95 ms | server CPU ms/req |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    labels = {
        "bare": "bare FastAPI + SQLite",
        "qrm": "qrm server (every plugin installed here)",
        "qrm:core": "qrm server, core alone (plugins disabled)",
        "qrm:kea": "qrm server, plugins + Kea (hosts database)",
        "qrm:kea-config": "qrm server, plugins + Kea (reservations in its configuration)",
    }
    for kind in kinds:
        r, h = summary[kind]["registrations"], summary[kind]["heartbeats"]
        print(
            f"| {labels[kind]} | {r['per_second']:.0f} | {r['p95_ms']:.1f} | {r['server_cpu_ms_per_request']:.2f} "
            f"| {h['per_second']:.0f} | {h['p95_ms']:.1f} | {h['server_cpu_ms_per_request']:.2f} |"
        )
    for kind, ratio in summary.get("ratio", {}).items():
        print(
            f"| **{labels[kind]} / bare** (median of per-repetition ratios) | **{ratio['registrations']:.2f}** "
            f"| | | **{ratio['heartbeats']:.2f}** | | |"
        )
    print(f"\nJSON: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
