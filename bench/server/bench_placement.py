#!/usr/bin/env python3
"""Placement: 1,000 virtual environments onto N idle resources, one reconcile pass.

For each database backend and each N (default 100, 1,000, 10,000), on a
fresh database:

* N idle resources with realistic, varied facts (physical machines of 2-64
  CPUs and 2-512 GB; a quarter are VMs of the ``fake`` hypervisor on some of
  those machines), inserted in bulk;
* min(1000, N) single-deployment VEs with varied requirements (kind,
  hypervisor, minimum CPUs and memory), each with its own filesystem image on
  a ``fake`` storage server, all asked to run;
* then :meth:`qrm_core.engine.reconciler.Reconciler.tick` runs once (every
  VE that can be placed is placed: guarded updates, events, exports through
  the fake storage driver) and once more (steady state: nothing to do).

Reported per step from ``TickReport.durations`` (failures, failover,
placement, exports, partitions, states), medians over ``--repeat`` fresh
databases; the target is placement of 1,000 VEs on 10,000 resources in
under 1 s. Checked after each pass: no resource serves two VEs, every
assigned resource meets its VE's requirements.

PostgreSQL runs in a private schema of ``--postgres-url`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), dropped afterwards.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/server/bench_placement.py
    .venv/bin/python bench/server/bench_placement.py --backends sqlite --sizes 10000 --repeat 1

Results: a Markdown table on stdout, JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa
from _common import machine, median, save_results
from sqlalchemy.engine import make_url

from qrm_core import db
from qrm_core.config import Settings
from qrm_core.lab.simulate import ip_for, mac_for
from qrm_core.models import (
    FilesystemImage,
    Resource,
    VirtualEnvironment,
    utcnow,
)
from qrm_core.plugins import PluginSystem

STEPS = ("failures", "failover", "placement", "exports", "partitions", "states")
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

CPU_CHOICES = (2, 4, 8, 16, 32, 64)
MEMORY_PER_CPU_MB = (1024, 2048, 4096, 8192)


@contextmanager
def database(backend: str, workdir: Path, pg_url: str) -> Iterator[str]:
    """A fresh, migrated database; dropped afterwards."""
    if backend == "sqlite":
        path = workdir / f"bench-{secrets.token_hex(3)}.db"
        url = f"sqlite:///{path}"
        engine = db.create_db_engine(url)
        db.upgrade(engine)
        engine.dispose()
        try:
            yield url
        finally:
            for suffix in ("", "-wal", "-shm", ".migrate.lock"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        return
    schema = f"qrm_bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = sa.create_engine(make_url(pg_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    text = (
        make_url(pg_url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    try:
        engine = db.create_db_engine(text)
        db.upgrade(engine)
        engine.dispose()
        yield text
    finally:
        db.dispose_engines()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def populate(settings: Settings, plugins: PluginSystem, n: int, ves: int, rng: random.Random) -> None:
    """Storage, a boot image, ``n`` idle resources and ``ves`` VEs asked to run."""
    from qrm_core.services import boot_images, service_context, storage

    with service_context(settings, actor="bench", plugins=plugins) as ctx:
        storage.add_storage(ctx, name="store1", type="fake", address="10.0.0.5")
    with service_context(settings, actor="bench", plugins=plugins) as ctx:
        boot_images.add_boot_image(ctx, name="debian12", kernel_version="6.1.0-13-amd64")

    now = utcnow()
    physical = n - n // 4
    rows: list[dict[str, Any]] = []
    for i in range(1, n + 1):
        cpus = rng.choice(CPU_CHOICES)
        row: dict[str, Any] = {
            "mac": mac_for(i),
            "ip": ip_for(i),
            "hostname": f"node{i:05d}",
            "kind": "physical",
            "host_id": None,
            "hypervisor": None,
            "capabilities": [],
            "cpus": cpus,
            "memory_mb": cpus * rng.choice(MEMORY_PER_CPU_MB),
            "state": "idle",
            "boot_generation": rng.randint(0, 5),
            "load": round(rng.random(), 2),
            "last_seen": now - timedelta(seconds=rng.uniform(0, 9)),
            "state_changed_at": now - timedelta(hours=rng.uniform(0, 48)),
            "token_hash": secrets.token_hex(32),
            "comment": "",
            "created_at": now - timedelta(days=rng.uniform(0, 30)),
        }
        if i > physical:
            # A VM of the fake hypervisor on one of the first machines (ids follow insertion order).
            row.update(
                kind="virtual",
                host_id=rng.randint(1, max(1, min(physical, n // 10))),
                hypervisor="fake",
                cpus=rng.choice((1, 2, 4)),
            )
            row["memory_mb"] = row["cpus"] * rng.choice((512, 1024, 2048))
        rows.append(row)
    hosts = {r["host_id"] for r in rows if r["host_id"]}
    for host in hosts:
        rows[host - 1]["capabilities"] = ["fake"]
    engine = db.get_engine(settings)
    table = Resource.__table__  # type: ignore[attr-defined]
    with engine.begin() as conn:
        for start in range(0, len(rows), 2000):
            conn.execute(sa.insert(table), rows[start : start + 2000])

    fs_table = FilesystemImage.__table__  # type: ignore[attr-defined]
    ve_table = VirtualEnvironment.__table__  # type: ignore[attr-defined]
    with engine.begin() as conn:
        storage_id = conn.execute(sa.text("SELECT id FROM storage_server")).scalar_one()
        boot_id = conn.execute(sa.text("SELECT id FROM boot_image")).scalar_one()
        conn.execute(
            sa.insert(fs_table),
            [
                {
                    "name": f"fs-app{j:04d}",
                    "storage_id": storage_id,
                    "location": f"/export/app{j:04d}",
                    "origin": "imported",
                    "state": "ready",
                    "size_mb": None,
                    "comment": "",
                    "created_at": now,
                }
                for j in range(1, ves + 1)
            ],
        )
        fs_ids: dict[str, int] = dict(conn.execute(sa.text("SELECT name, id FROM filesystem_image")).all())
        ve_rows = []
        for j in range(1, ves + 1):
            pick = rng.random()
            kind = hypervisor = None
            if pick < 0.15:
                kind, hypervisor = "virtual", "fake"
            elif pick < 0.55:
                kind = "physical"
            cpus = rng.choice((0, 1, 2, 2, 4, 8, 16)) if hypervisor is None else rng.choice((0, 1, 2))
            memory = rng.choice((0, 1024, 2048, 4096, 8192, 32768)) if hypervisor is None else 1024
            ve_rows.append(
                {
                    "name": f"app{j:04d}",
                    "boot_image_id": boot_id,
                    "fs_image_id": fs_ids[f"fs-app{j:04d}"],
                    "deployment": "single",
                    "req_kind": kind,
                    "req_hypervisor": hypervisor,
                    "req_cpus": cpus,
                    "req_memory_mb": memory,
                    "pool_size": 1,
                    "failover": rng.random() < 0.5,
                    "kernel_args": "",
                    "desired_state": "running",
                    "state": "starting",
                    "problem": "",
                    "generation": 1,
                    "comment": "",
                    "created_at": now,
                    "updated_at": now,
                }
            )
        conn.execute(sa.insert(ve_table), ve_rows)


def check(settings: Settings) -> dict[str, int]:
    """No resource in two VEs (the schema allows one ve_id), requirements met, counts."""
    engine = db.get_engine(settings)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT r.id, r.kind, r.hypervisor, r.cpus, r.memory_mb, v.id, v.req_kind, v.req_hypervisor,"
                " v.req_cpus, v.req_memory_mb FROM resource r JOIN virtual_environment v ON r.ve_id = v.id"
            )
        ).all()
        per_ve = conn.execute(
            sa.text("SELECT ve_id, count(*) FROM resource WHERE ve_id IS NOT NULL GROUP BY ve_id")
        ).all()
        problems = conn.execute(
            sa.text("SELECT count(*) FROM virtual_environment WHERE problem <> ''")
        ).scalar_one()
    for rid, kind, hv, cpus, mem, ve, req_kind, req_hv, req_cpus, req_mem in rows:
        if (req_kind and kind != req_kind) or (req_hv and hv != req_hv) or cpus < req_cpus or mem < req_mem:
            raise AssertionError(f"resource {rid} does not meet the requirements of VE {ve}")
    over = [ve for ve, count in per_ve if count > 1]
    if over:
        raise AssertionError(f"single VEs with more than one resource: {over[:5]}")
    return {"assigned": len(rows), "unplaced_with_problem": int(problems)}


def run_once(backend: str, n: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from qrm_core.engine.reconciler import Reconciler

    workdir = Path(tempfile.mkdtemp(prefix=f"qrm-bench-place-{os.getpid()}-"))
    try:
        with database(backend, workdir, args.postgres_url) as url:
            settings = Settings(data_dir=workdir / "data", database_url=url)
            plugins = PluginSystem(settings, discover_plugins=False).load()
            ves = min(args.ves, n)
            populate(settings, plugins, n, ves, random.Random(seed))
            reconciler = Reconciler(settings, plugins)
            t0 = time.perf_counter()
            first = reconciler.tick()
            first_wall = time.perf_counter() - t0
            counts = check(settings)
            if first.assigned != counts["assigned"]:
                raise AssertionError(
                    f"tick says {first.assigned} assigned, the database {counts['assigned']}"
                )
            second = reconciler.tick()
            db.dispose_engines()
            return {
                "backend": backend,
                "n": n,
                "ves": ves,
                "assigned": first.assigned,
                "unplaced_with_problem": counts["unplaced_with_problem"],
                "first_pass": {k: round(v, 4) for k, v in first.durations.items()},
                "first_pass_total": round(first_wall, 4),
                "second_pass": {k: round(v, 4) for k, v in second.durations.items()},
                "second_pass_total": round(second.duration, 4),
            }
    finally:
        db.dispose_engines()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100,1000,10000", help="idle resources (default 100,1000,10000)")
    parser.add_argument("--ves", type=int, default=1000, help="VEs to place (at most N; default 1000)")
    parser.add_argument("--backends", default="sqlite,postgresql", help="sqlite and/or postgresql")
    parser.add_argument("--repeat", type=int, default=3, help="fresh databases per size; medians reported")
    parser.add_argument("--postgres-url", default=os.environ.get("QRM_TEST_POSTGRES_URL", DEFAULT_PG))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    info = machine()
    print(f"# machine: {info}", file=sys.stderr)
    result: dict[str, Any] = {
        "benchmark": "server-placement",
        "machine": info,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": vars(args) | {"postgres_url": make_url(args.postgres_url).render_as_string()},
        "runs": [],
    }
    rows = []
    for backend in backends:
        for n in sizes:
            runs = []
            for rep in range(args.repeat):
                run = run_once(backend, n, args, seed=rep)
                runs.append(run)
                print(
                    f"# {backend} N={n} rep {rep + 1}: assigned {run['assigned']}/{run['ves']}, "
                    f"placement {run['first_pass']['placement'] * 1000:.0f} ms, "
                    f"pass {run['first_pass_total'] * 1000:.0f} ms, steady pass "
                    f"{run['second_pass_total'] * 1000:.0f} ms",
                    file=sys.stderr,
                )
            result["runs"].extend(runs)
            rows.append(
                {
                    "backend": backend,
                    "n": n,
                    "ves": runs[0]["ves"],
                    "assigned": median([r["assigned"] for r in runs]),
                    "first": {s: median([r["first_pass"][s] for r in runs]) for s in STEPS},
                    "first_total": median([r["first_pass_total"] for r in runs]),
                    "second_total": median([r["second_pass_total"] for r in runs]),
                }
            )
    result["summary"] = rows
    path = save_results("server-placement", result)

    print(f"\nFirst reconcile pass after {args.ves} VEs were asked to run; medians of {args.repeat}, ms\n")
    print(
        "| backend | idle resources | VEs | placed | placement | exports | failures | states "
        "| whole pass | next pass (nothing to do) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        f = row["first"]
        print(
            f"| {row['backend']} | {row['n']:,} | {row['ves']:,} | {row['assigned']:.0f} "
            f"| **{f['placement'] * 1000:.0f}** | {f['exports'] * 1000:.0f} | {f['failures'] * 1000:.1f} "
            f"| {f['states'] * 1000:.1f} | {row['first_total'] * 1000:.0f} | {row['second_total'] * 1000:.1f} |"
        )
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
