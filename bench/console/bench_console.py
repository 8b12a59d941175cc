#!/usr/bin/env python3
"""The web console at scale: 10,000 resources and 1,000 virtual environments.

Each repetition prepares a fresh data directory (embedded SQLite, or
PostgreSQL with ``--backend postgresql``) with the generator of
``bench/server/bench_list.py`` (N resources with realistic facts, a quarter
VMs, 1,000 serving running VEs), starts a real ``qrm server`` process on
127.0.0.1 (tracked and stopped by its PID), logs in as qrm/qrm and measures:

* **server time** of the Dashboard (``GET /``) and of the Resources page
  (``GET /resources``, pages in random order, and filtered by state), over
  one keep-alive connection, one request at a time: the wall time of the
  request on loopback (the server's share: the client is a lean HTTP/1.1
  writer). Reference in the same run: ``GET /api/v1/resources?limit=100``
  (the same hundred resources as JSON through the API), reported as a ratio.
* **first contentful paint** of both pages in headless Chromium (Debian's,
  through Playwright; ``performance.getEntriesByType('paint')``), beside the
  login page's (no database, the same stylesheet) as the reference.
* **live latency**: a resource page is open in Chromium; an agent's heartbeat
  changes the resource's state (error -> idle); the time from sending the
  heartbeat to the new state in the page's DOM (a MutationObserver stamps
  it), ``--live-rounds`` times.

Targets (issue 14): both pages <= 300 ms server time and <= 1 s to first
contentful paint; a state change in an open page <= 1 s after the heartbeat.

Usage (from the repository root, with the project's virtualenv and Chromium):

    .venv/bin/python bench/console/bench_console.py
    .venv/bin/python bench/console/bench_console.py -n 1000 --repeat 1

Results: a summary on stdout, JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))

import httpx
import sqlalchemy as sa
from _common import ChildServer, Connection, free_port, machine, median, percentile, save_results
from bench_list import prepare, wait_quiet
from bench_placement import DEFAULT_PG
from sqlalchemy.engine import make_url

from qrm_core import db
from qrm_core.config import Settings

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=127.0.0.1",
]
MAC = "02:bb:00:00:00:01"


def log_in(url: str) -> str:
    """The session cookie of qrm/qrm, through the login form."""
    with httpx.Client(base_url=url, timeout=30) as client:
        form = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token, form.text[:300]
        answer = client.post("/login", data={"user": "qrm", "password": "qrm", "csrf_token": token.group(1)})
        if answer.status_code != 303:
            raise RuntimeError(f"login: {answer.status_code} {answer.text[:200]}")
        return str(client.cookies["qrm_session"])


async def timed(conn: Connection, path: str, headers: dict[str, str], expect: str) -> float:
    started = time.perf_counter()
    status, data = await conn.request("GET", path, headers=headers)
    elapsed = time.perf_counter() - started
    if status != 200 or expect.encode() not in data:
        raise RuntimeError(f"{path}: {status} {data[:300]!r}")
    return elapsed


async def server_times(port: int, n: int, cookie: str, rounds: int) -> dict[str, Any]:
    conn = await Connection.open("127.0.0.1", port)
    web = {"Cookie": f"qrm_session={cookie}", "Accept": "text/html"}
    api = {"Authorization": "Basic cXJtOnFybQ=="}  # qrm:qrm
    pages = list(range(1, (n + 99) // 100 + 1))
    found: dict[str, list[float]] = {"dashboard": [], "resources": [], "resources_active": [], "api_page": []}
    try:
        for _ in range(rounds):
            found["dashboard"].append(await timed(conn, "/", web, "<h1>Dashboard</h1>"))
            for number in random.sample(pages, min(20, len(pages))):
                found["resources"].append(
                    await timed(conn, f"/resources?page={number}", web, "<h1>Resources</h1>")
                )
                offset = (number - 1) * 100
                found["api_page"].append(
                    await timed(conn, f"/api/v1/resources?limit=100&offset={offset}", api, '"items"')
                )
            found["resources_active"].append(
                await timed(conn, "/resources?state=active", web, "<h1>Resources</h1>")
            )
    finally:
        conn.close()
    result: dict[str, Any] = {}
    for key, values in found.items():
        result[key] = {
            "requests": len(values),
            "median_ms": round(median(values) * 1000, 1),
            "p95_ms": round(percentile(values, 95) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1),
        }
    result["resources_to_api_ratio"] = round(
        result["resources"]["median_ms"] / result["api_page"]["median_ms"], 2
    )
    return result


def paint_and_live(url: str, cookie: str, settings: Settings, rounds: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("QRM_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    enrollment = _enrollment_token(settings)
    result: dict[str, Any] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(base_url=url, viewport={"width": 1366, "height": 860})
            context.add_cookies([{"name": "qrm_session", "value": cookie, "url": url}])
            page = context.new_page()

            def fcp(path: str) -> float:
                fresh = context.new_page()
                fresh.goto(path, wait_until="load")
                fresh.wait_for_function(
                    "performance.getEntriesByType('paint').some(e => e.name === 'first-contentful-paint')"
                )
                value = fresh.evaluate(
                    "performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint').startTime"
                )
                fresh.close()
                return float(value)

            paints: dict[str, list[float]] = {"login": [], "dashboard": [], "resources": []}
            for _ in range(5):
                for name, path in (("login", "/login"), ("dashboard", "/"), ("resources", "/resources")):
                    paints[name].append(fcp(path))
            result["fcp_ms"] = {name: round(median(values), 1) for name, values in paints.items()}
            result["fcp_ratio_to_login"] = {
                name: round(median(values) / median(paints["login"]), 2) for name, values in paints.items()
            }

            # Live: a new machine registers; each round puts it in error (directly in
            # the database, as a lost heartbeat would), opens its page, and heartbeats.
            with httpx.Client(base_url=url, timeout=30) as agent:
                headers = {"Authorization": f"Bearer {enrollment}"}
                body = {"mac": MAC, "ip": "198.18.200.1", "cpus": 2, "memory_mb": 2048, "hypervisors": []}
                registered = agent.post("/agent/v1/register", json=body, headers=headers).json()
                rid, token = registered["resource_id"], registered["token"]
                latencies = []
                engine = sa.create_engine(settings.effective_database_url)
                for _ in range(rounds):
                    with engine.begin() as conn:
                        conn.execute(
                            sa.text("UPDATE resource SET state = 'error' WHERE id = :id"), {"id": rid}
                        )
                    page.goto(f"/resources/{rid}")
                    page.wait_for_selector("#live-state.on")
                    assert page.locator("#resource-live .lead .state").inner_text() == "error"
                    page.evaluate(
                        """() => { window.__seen = null;
                        new MutationObserver(() => {
                          const s = document.querySelector('#resource-live .lead .state');
                          if (s && s.textContent === 'idle' && window.__seen === null) window.__seen = Date.now();
                        }).observe(document.getElementById('main'), {subtree: true, childList: true, characterData: true}); }"""
                    )
                    sent = time.time() * 1000
                    beat = agent.post(
                        "/agent/v1/heartbeat",
                        json={"resource_id": rid, "state": "idle", "load": 0.1, "boot_generation": 0},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    if beat.status_code != 200:
                        raise RuntimeError(f"heartbeat: {beat.status_code} {beat.text[:200]}")
                    page.wait_for_function("window.__seen !== null", timeout=10_000)
                    latencies.append(page.evaluate("window.__seen") - sent)
                engine.dispose()
            result["live_ms"] = {
                "rounds": len(latencies),
                "median": round(median(latencies), 1),
                "max": round(max(latencies), 1),
            }
        finally:
            browser.close()
    return result


def _enrollment_token(settings: Settings) -> str:
    from qrm_core.plugins import PluginSystem
    from qrm_core.services import service_context, site

    plugins = PluginSystem(settings, discover_plugins=False).load()
    with service_context(settings, actor="bench", plugins=plugins) as ctx:
        return site.get_enrollment_token(ctx)


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"qrm-bench-console-{os.getpid()}-"))
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
        settings = Settings(data_dir=data_dir, database_url=url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
        env["QRM_DATA_DIR"] = str(data_dir)
        env["QRM_HEARTBEAT_TIMEOUT"] = "86400"  # nobody heartbeats: nothing goes to error by itself
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
        settled = wait_quiet(server)
        cookie = log_in(server.url)
        result: dict[str, Any] = {"prepare_s": round(prepared, 1), "settle_s": round(settled, 1)}
        result["server"] = asyncio.run(server_times(port, args.n, cookie, args.rounds))
        result["browser"] = paint_and_live(server.url, cookie, settings, args.live_rounds)
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
    parser.add_argument(
        "-n", type=int, default=10000, help="resources (default 10000; VEs: n/10, at most 1000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of page requests per repetition")
    parser.add_argument("--live-rounds", type=int, default=10, help="heartbeats watched in the browser")
    parser.add_argument("--repeat", type=int, default=3, help="fresh servers; medians reported (default 3)")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default=os.environ.get("QRM_TEST_POSTGRES_URL", DEFAULT_PG))
    args = parser.parse_args()

    info = machine()
    print(f"# machine: {info}", file=sys.stderr)
    result: dict[str, Any] = {
        "benchmark": "console",
        "machine": info,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": vars(args) | {"postgres_url": make_url(args.postgres_url).render_as_string()},
        "runs": [],
    }
    for rep in range(args.repeat):
        run = run_once(args)
        result["runs"].append(run)
        s, b = run["server"], run["browser"]
        print(
            f"# rep {rep + 1}/{args.repeat}: dashboard {s['dashboard']['median_ms']} ms, resources "
            f"{s['resources']['median_ms']} ms (p95 {s['resources']['p95_ms']}), active "
            f"{s['resources_active']['median_ms']} ms, API page {s['api_page']['median_ms']} ms; FCP {b['fcp_ms']}; "
            f"live median {b['live_ms']['median']} ms, max {b['live_ms']['max']} ms",
            file=sys.stderr,
        )
    runs = result["runs"]
    result["summary"] = {
        "dashboard_ms": median([r["server"]["dashboard"]["median_ms"] for r in runs]),
        "dashboard_p95_ms": median([r["server"]["dashboard"]["p95_ms"] for r in runs]),
        "resources_ms": median([r["server"]["resources"]["median_ms"] for r in runs]),
        "resources_p95_ms": median([r["server"]["resources"]["p95_ms"] for r in runs]),
        "resources_active_ms": median([r["server"]["resources_active"]["median_ms"] for r in runs]),
        "api_page_ms": median([r["server"]["api_page"]["median_ms"] for r in runs]),
        "resources_to_api_ratio": median([r["server"]["resources_to_api_ratio"] for r in runs]),
        "fcp_ms": {
            k: median([r["browser"]["fcp_ms"][k] for r in runs]) for k in ("login", "dashboard", "resources")
        },
        "live_median_ms": median([r["browser"]["live_ms"]["median"] for r in runs]),
        "live_max_ms": max(r["browser"]["live_ms"]["max"] for r in runs),
    }
    path = save_results("console", result)
    print(json.dumps(result["summary"], indent=2))
    print(f"# results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
