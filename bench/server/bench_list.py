#!/usr/bin/env python3
"""Listing resources through the REST API: pages of 100 and the whole list, at N = 10,000.

Each repetition prepares a fresh data directory (embedded SQLite, or
PostgreSQL with ``--backend postgresql``) holding N resources with realistic
facts (the generator of ``bench_placement.py``): a quarter are VMs on hosts,
and 1,000 serve running virtual environments, so a listing resolves host and
VE names as in production. Nobody heartbeats, so the server runs with
``QRM_HEARTBEAT_TIMEOUT=86400`` (the resources stay as they are). Then it starts a real ``qrm server`` process on
127.0.0.1, waits until its engine has settled, and measures over real HTTP,
one request at a time (latency, not throughput):

* ``GET /api/v1/resources?limit=100&offset=...`` for every page, in random
  order, ``--rounds`` times: median and p95;
* ``GET /api/v1/resources`` (all N in one answer): median.

Both as the default admin with a password (HTTP basic; the server caches a
verified password) and with an API token (``qrm`` remote clients can use
either). The target is a page of 100 in under 50 ms at N = 10,000.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/server/bench_list.py
    .venv/bin/python bench/server/bench_list.py -n 1000 --repeat 1

Results: a Markdown table on stdout, JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa
from _common import ChildServer, Connection, free_port, machine, median, percentile, save_results
from bench_placement import DEFAULT_PG, populate
from sqlalchemy.engine import make_url

from qrm_core import db
from qrm_core.config import Settings
from qrm_core.plugins import PluginSystem

BASIC = "Basic " + base64.b64encode(b"qrm:qrm").decode()


def prepare(data_dir: Path, url: str | None, n: int) -> None:
    """A migrated database with N resources, 1,000 of them serving running VEs."""
    settings = Settings(data_dir=data_dir, database_url=url)
    engine = db.get_engine(settings)
    db.upgrade(engine)
    plugins = PluginSystem(settings, discover_plugins=False).load()
    ves = min(1000, n // 10)
    populate(settings, plugins, n, ves, random.Random(1))
    with engine.begin() as conn:
        for j in range(1, ves + 1):
            conn.execute(
                sa.text("UPDATE resource SET ve_id = :ve, state = 'active' WHERE id = :rid"),
                {"ve": j, "rid": j * 7},
            )
        conn.execute(sa.text("UPDATE virtual_environment SET state = 'running'"))
    db.dispose_engines()


def wait_quiet(server: ChildServer, timeout: float = 120.0) -> float:
    """Wait until the server uses under 5% of a CPU for a second (its engine has settled)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = server.cpu_seconds()
        time.sleep(1.0)
        if server.cpu_seconds() - before < 0.05:
            break
    return time.monotonic() - started


async def measure(port: int, n: int, rounds: int, auth: str) -> dict[str, Any]:
    conn = await Connection.open("127.0.0.1", port)
    headers = {"Authorization": auth}
    pages = list(range(0, n, 100))
    page_times: list[float] = []
    whole_times: list[float] = []
    whole_bytes = 0
    try:
        status, data = await conn.request("GET", "/api/v1/resources?limit=100&offset=0", headers=headers)
        if status != 200:
            raise RuntimeError(f"list: {status} {data[:200]!r}")
        first = json.loads(data)
        if first["total"] != n or len(first["items"]) != min(100, n):
            raise RuntimeError(f"list: expected {n} resources, got total {first['total']}")
        for _ in range(rounds):
            random.shuffle(pages)
            for offset in pages:
                started = time.perf_counter()
                status, data = await conn.request(
                    "GET", f"/api/v1/resources?limit=100&offset={offset}", headers=headers
                )
                page_times.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"page {offset}: {status}")
            started = time.perf_counter()
            status, data = await conn.request("GET", "/api/v1/resources", headers=headers)
            whole_times.append(time.perf_counter() - started)
            if status != 200 or len(json.loads(data)["items"]) != n:
                raise RuntimeError(f"whole list: {status}")
            whole_bytes = len(data)
    finally:
        conn.close()
    return {
        "page_requests": len(page_times),
        "page_median_ms": round(median(page_times) * 1000, 2),
        "page_p95_ms": round(percentile(page_times, 95) * 1000, 2),
        "page_max_ms": round(max(page_times) * 1000, 2),
        "whole_median_ms": round(median(whole_times) * 1000, 1),
        "whole_bytes": whole_bytes,
    }


def api_token(port: int) -> str:
    async def create() -> str:
        conn = await Connection.open("127.0.0.1", port)
        try:
            status, data = await conn.request(
                "POST", "/api/v1/auth/tokens", {"name": "bench"}, {"Authorization": BASIC}
            )
        finally:
            conn.close()
        if status != 201:
            raise RuntimeError(f"token: {status} {data[:200]!r}")
        return str(json.loads(data)["token"])

    return asyncio.run(create())


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"qrm-bench-list-{os.getpid()}-"))
    data_dir = workdir / "data"
    url: str | None = None
    schema = None
    admin = None
    server: ChildServer | None = None
    try:
        if args.backend == "postgresql":
            schema = f"qrm_bench_{os.getpid()}_{secrets.token_hex(3)}"
            admin = sa.create_engine(make_url(args.postgres_url), isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
            url = (
                make_url(args.postgres_url)
                .update_query_dict({"options": f"-csearch_path={schema}"})
                .render_as_string(hide_password=False)
            )
        t0 = time.perf_counter()
        prepare(data_dir, url, args.n)
        prepared = time.perf_counter() - t0
        env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
        env["QRM_DATA_DIR"] = str(data_dir)
        # Nobody heartbeats here: keep the resources from going to error mid-measurement.
        env["QRM_HEARTBEAT_TIMEOUT"] = "86400"
        if url:
            env["QRM_DATABASE_URL"] = url
        port = free_port()
        qrm = Path(sys.executable).parent / "qrm"
        server = ChildServer(
            "qrm server",
            [str(qrm), "server", "--host", "127.0.0.1", "--port", str(port)],
            port,
            env,
            workdir / "qrm-server.out",
        )
        server.wait_ready("/api/v1/health")
        token = api_token(port)
        settled = wait_quiet(server)
        result: dict[str, Any] = {"prepare_s": round(prepared, 1), "settle_s": round(settled, 1)}
        for name, auth in (("password", BASIC), ("token", f"Bearer {token}")):
            result[name] = asyncio.run(measure(port, args.n, args.rounds, auth))
        return result
    finally:
        if server is not None:
            server.stop()
        db.dispose_engines()
        if admin is not None and schema is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            admin.dispose()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10000, help="resources (default 10000)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over all pages per repetition (default 3)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="fresh servers; medians reported (default 3)")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default=os.environ.get("QRM_TEST_POSTGRES_URL", DEFAULT_PG))
    args = parser.parse_args()

    info = machine()
    print(f"# machine: {info}", file=sys.stderr)
    result: dict[str, Any] = {
        "benchmark": "server-list",
        "machine": info,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": vars(args) | {"postgres_url": make_url(args.postgres_url).render_as_string()},
        "runs": [],
    }
    for rep in range(args.repeat):
        run = run_once(args)
        result["runs"].append(run)
        for auth in ("password", "token"):
            r = run[auth]
            print(
                f"# rep {rep + 1}/{args.repeat} {auth:8}: page median {r['page_median_ms']} ms, "
                f"p95 {r['page_p95_ms']} ms, max {r['page_max_ms']} ms; whole list {r['whole_median_ms']} ms "
                f"({r['whole_bytes'] / 1e6:.1f} MB)",
                file=sys.stderr,
            )
    summary = {
        auth: {
            key: median([run[auth][key] for run in result["runs"]])
            for key in ("page_median_ms", "page_p95_ms", "whole_median_ms", "whole_bytes")
        }
        for auth in ("password", "token")
    }
    result["summary"] = summary
    path = save_results("server-list", result)
    print(
        f"\n{args.backend}, N={args.n:,} resources, {args.repeat} repetition(s) x {args.rounds} rounds; medians\n"
    )
    print("| auth | page of 100: median ms | page of 100: p95 ms | whole list ms | whole list size |")
    print("|---|---:|---:|---:|---:|")
    for auth in ("password", "token"):
        s = summary[auth]
        print(
            f"| {auth} | **{s['page_median_ms']:.1f}** | {s['page_p95_ms']:.1f} | {s['whole_median_ms']:.0f} "
            f"| {s['whole_bytes'] / 1e6:.1f} MB |"
        )
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
