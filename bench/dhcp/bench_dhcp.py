#!/usr/bin/env python3
"""DHCP benchmark: full rewrites and single changes at 100 / 1,000 / 10,000 resources.

What it measures, per backend (Kea, ISC dhcpd) and size, with the real
servers (run as root; they live in a network namespace this script creates
and deletes; nothing is sent outside it):

* full rewrite, server not running: read the resources from the qrm database
  (SQLite), render, write the temporary file, check it with the real tool
  (``kea-dhcp4 -t`` / ``dhcpd -t``), swap it in; each step and the total;
* full rewrite with the server running: the same plus bringing the server up
  to date (Kea: ``config-test`` + ``config-set``; ISC: one OMAPI lookup per
  host, nothing to change; Kea hosts database: one read of the rows, nothing
  to change). With a hosts database, "server down" is a rewrite into an empty
  hosts table (every row inserted);
* one change (a new resource reserved, then removed), as the resource hooks
  do it: Kea ``config-set`` (whole configuration), Kea hosts database
  (PostgreSQL and MariaDB: one row), ISC OMAPI (one host object);
* a burst (Kea without a hosts database, ``--burst K``): K new resources are
  inserted, then K threads call ``upsert`` at once, as K registrations
  arriving together would; the wall time until all K have returned, the
  number of ``config-set`` commands Kea logged for them, and the slowest
  caller, three ways: group commit (the plugin's behaviour); off (every
  change its own rewrite, one after another: ``KeaBackend(coalesce=False)``);
  and the change path of the commit before group commit (a rewrite per
  change, all overlapping; replayed here by ``previous_change``). The K
  reservations are checked in Kea's running configuration afterwards (the
  first two modes fail the run if one is missing; the third reports it). All
  K rows are committed before the burst starts, so every rewrite reads all
  of them: the previous code's lost reservations (a rewrite that read before
  another change's commit applied last) cannot show here;
  ``plugins/qrm_dhcpd/tests/test_dhcpd_kea_burst.py`` covers that case.

Usage (from the repository root, in a virtualenv with qrm-core and qrm-dhcpd):

    sudo .venv/bin/python bench/dhcp/bench_dhcp.py                 # 100, 1000, 10000
    sudo .venv/bin/python bench/dhcp/bench_dhcp.py --sizes 1000 --changes 5 --no-db
    sudo .venv/bin/python bench/dhcp/bench_dhcp.py --sizes 1000,10000 --backends kea --no-db --burst 100

Results: a Markdown table on stdout and JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from qrm_core import db
from qrm_core.config import Settings
from qrm_core.models import Resource
from qrm_core.testkit import Netns
from qrm_dhcpd.backends import Backend, KeaBackend, get_backend
from qrm_dhcpd.kea import KeaControl
from qrm_dhcpd.keadb import db_init, dispose_engines
from qrm_dhcpd.service import ManagedDhcpServer
from qrm_dhcpd.settings import DhcpdSettings

SUBNET = ipaddress.ip_network("10.98.0.0/16")
SERVER = "10.98.0.1"
FIRST_RESERVED = ipaddress.ip_address("10.98.1.0")
PG_SOCKET_DIR = os.environ.get("QRM_TEST_POSTGRES_SOCKET_DIR", "/var/run/postgresql")
MYSQL_SOCKET = os.environ.get("QRM_TEST_MYSQL_SOCKET", "/run/mysqld/mysqld.sock")
PG_ADMIN = os.environ.get("QRM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_ADMIN = os.environ.get("QRM_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def mac(i: int) -> str:
    return "52:54:" + ":".join(f"{(i >> s) & 255:02x}" for s in (24, 16, 8, 0))


@contextmanager
def namespace() -> Iterator[tuple[str, str]]:
    """The server's namespace (and a client's at the other end of a veth pair); always deleted."""
    srv = Netns("dbs")
    cli: Netns | None = None
    interface = f"qdb{os.getpid() % 100000}S"
    try:
        cli = Netns("dbc")
        srv.ip(
            "link", "add", interface, "type", "veth", "peer", "name", interface[:-1] + "C", "netns", cli.name
        )
        srv.ip("addr", "add", f"{SERVER}/16", "dev", interface)
        srv.ip("link", "set", interface, "up")
        yield srv.name, interface
    finally:
        for ns in (srv, cli):
            if ns is not None:
                ns.delete()


def core_settings(workdir: Path, size: int) -> Settings:
    core = Settings(data_dir=workdir / "data", database_url=f"sqlite:///{workdir}/qrm.db", actor="bench")
    engine = db.get_engine(core)
    db.upgrade(engine)
    rows = [
        {
            "mac": mac(i),
            "ip": str(FIRST_RESERVED + i),
            "hostname": f"node{i}",
            "kind": "physical",
            "state": "idle",
            "capabilities": [],
        }
        for i in range(size)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(Resource), rows)
    return core


def dhcpd_settings(backend: str, netns: str, interface: str, workdir: Path, **extra: Any) -> DhcpdSettings:
    return DhcpdSettings(
        backend=backend,
        interface=interface,
        subnet=SUBNET,
        pool_start="10.98.0.100",
        pool_end="10.98.0.200",
        router=SERVER,
        next_server=SERVER,
        netns=netns,
        state_dir=workdir / f"state-{backend}",
        kea_control_socket=Path(tempfile.mkdtemp(prefix="qdb")) / "kea4.sock",
        timeout=60,
        **extra,
    )


def median_of(values: list[dict[str, float]]) -> dict[str, float]:
    keys = values[0].keys()
    return {k: statistics.median(v[k] for v in values) for k in keys}


def timed(func: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def change_cost(backend: Backend, core: Settings, size: int, changes: int) -> dict[str, float]:
    """Median seconds to reserve one new resource and to release it again, as the hooks do."""
    engine = db.get_engine(core)
    add, remove = [], []
    for n in range(changes):
        i = size + 1000 + n
        new_mac, new_ip, new_name = mac(i), str(FIRST_RESERVED + i), f"new{i}"
        row = {
            "mac": new_mac,
            "ip": new_ip,
            "hostname": new_name,
            "kind": "physical",
            "state": "idle",
            "capabilities": [],
        }
        with engine.begin() as conn:
            key = conn.execute(sa.insert(Resource).values(**row)).inserted_primary_key
            rid = int(key[0]) if key is not None else None
        t0 = time.perf_counter()
        backend.upsert(mac=new_mac, ip=new_ip, hostname=new_name, resource_id=rid)
        add.append(time.perf_counter() - t0)
        with engine.begin() as conn:
            conn.execute(sa.delete(Resource).where(col(Resource.id) == rid))
        t0 = time.perf_counter()
        backend.remove(new_mac)
        remove.append(time.perf_counter() - t0)
    return {"add": statistics.median(add), "remove": statistics.median(remove)}


def kea_log_count(server: ManagedDhcpServer, command: str) -> int:
    """How many times the running Kea logged receiving ``command`` (its own log, not ours)."""
    text = server.backend.paths.log.read_text(errors="replace")
    return text.count(f"COMMAND_RECEIVED Received command '{command}'")


def previous_change(backend: KeaBackend) -> None:
    """The change path before group commit (as in the commit before it): a rewrite per change, overlapping."""
    from qrm_dhcpd import kea
    from qrm_dhcpd.system import atomic_write

    hosts = backend.host_set()
    config = backend.config(hosts)
    text = kea.dumps(config)
    try:
        backend.control.config_set(config, text=text)
    except kea.KeaUnreachable:
        backend._full_sync(apply=False)
        raise
    atomic_write(backend.paths.config, text)


#: Burst modes: group commit (the plugin), a rewrite per change in turn, and the code before group commit.
BURST_MODES = ("on", "off", "before")


def burst_cost(
    server: ManagedDhcpServer, settings: DhcpdSettings, core: Settings, first: int, k: int, mode: str
) -> dict[str, Any]:
    """K new resources, then K concurrent changes (a backend each, as the hooks make them)."""
    engine = db.get_engine(core)
    nodes = []
    with engine.begin() as conn:
        for i in range(first, first + k):
            row = {"mac": mac(i), "ip": str(FIRST_RESERVED + i), "hostname": f"burst{i}", "kind": "physical",
                   "state": "idle", "capabilities": []}  # fmt: skip
            key = conn.execute(sa.insert(Resource).values(**row)).inserted_primary_key
            nodes.append((row["mac"], row["ip"], row["hostname"], int(key[0]) if key is not None else None))
    coordinator = KeaBackend(settings, core).coordinator
    sets0, rewrites0 = kea_log_count(server, "config-set"), coordinator.rewrites
    barrier = threading.Barrier(k + 1)
    latencies: list[float] = []
    failures: list[str] = []

    def change(node: tuple[str, str, str, int | None]) -> None:
        backend = KeaBackend(settings, core, coalesce=mode == "on")
        barrier.wait()
        t0 = time.perf_counter()
        try:
            if mode == "before":
                previous_change(backend)
            else:
                backend.upsert(mac=node[0], ip=node[1], hostname=node[2], resource_id=node[3])
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failures.append(f"{type(exc).__name__}: {exc}")
        latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=change, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    load = os.getloadavg()[0]
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    answer = KeaControl(server.backend.paths.control_socket, 60).command("config-get")
    live = {r["hw-address"] for r in answer["arguments"]["Dhcp4"]["subnet4"][0].get("reservations", [])}
    missing = sum(1 for node in nodes if node[0] not in live)
    if mode != "before" and (failures or missing):
        raise RuntimeError(f"burst: {len(failures)} failed ({failures[:1]}), {missing} not in Kea")
    result = {
        "wall": wall,
        "config_sets": kea_log_count(server, "config-set") - sets0,
        "rewrites": coordinator.rewrites - rewrites0,
        "slowest": max(latencies),
        "median": statistics.median(latencies),
        "load": load,
        "failed": len(failures),
        "missing": missing,
        "first_failure": failures[0] if failures else "",
    }
    with engine.begin() as conn:  # back to `size` resources for whatever comes next
        conn.execute(sa.delete(Resource).where(col(Resource.id).in_([node[3] for node in nodes])))
    KeaBackend(settings, core).full_sync()
    return result


def bench_backend(
    name: str,
    label: str,
    settings: DhcpdSettings,
    core: Settings,
    size: int,
    repeat: int,
    changes: int,
    burst: int = 0,
) -> dict[str, Any]:
    backend = get_backend(settings, core)
    result: dict[str, Any] = {"backend": label, "size": size}
    offline = []
    for _ in range(repeat):
        if settings.kea_hosts_database is not None:
            backend.hosts_db.replace_all([])  # type: ignore[attr-defined]  # every row to be inserted again
        offline.append(backend.full_sync().timings)
    result["offline"] = median_of(offline)
    server = ManagedDhcpServer(settings, core)
    t_start = timed(server.start)
    try:
        result["start"] = t_start
        live = [backend.full_sync().timings for _ in range(repeat)]
        result["live"] = median_of(live)
        result["change"] = change_cost(backend, core, size, changes)
        if burst and label == "kea":
            result["burst"] = {"k": burst}
            for n, mode in enumerate(BURST_MODES, start=1):
                result["burst"][mode] = burst_cost(server, settings, core, size + n * 100_000, burst, mode)
        assert server.process is not None and server.process.poll() is None, "server died"
    finally:
        server.stop()
    return result


@contextmanager
def hosts_database(kind: str, name: str) -> Iterator[str | None]:
    admin_url = PG_ADMIN if kind == "postgresql" else MYSQL_ADMIN
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    quote = '"' if kind == "postgresql" else "`"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {quote}{name}{quote}")
    except sa.exc.OperationalError as exc:
        print(f"# {kind} not reachable ({str(exc.orig).strip()}); skipped", file=sys.stderr)
        yield None
        return
    if kind == "postgresql":
        url = f"postgresql://{sa.engine.make_url(admin_url).username or 'postgres'}@/{name}?host={PG_SOCKET_DIR}"
    else:
        url = f"mysql://{sa.engine.make_url(admin_url).username or 'root'}@localhost/{name}?unix_socket={MYSQL_SOCKET}"
    try:
        db_init(url, "kea-admin")
        yield url
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote}{name}{quote}")
        admin.dispose()


def versions() -> dict[str, str]:
    def out(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kea": out("kea-dhcp4", "-V"),
        "dhcpd": out("dpkg-query", "-W", "-f=${Version}", "isc-dhcp-server"),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--repeat", type=int, default=3, help="full rewrites per measurement (median)")
    parser.add_argument("--changes", type=int, default=10, help="single changes per measurement (median)")
    parser.add_argument(
        "--no-db", action="store_true", help="skip Kea's hosts database (PostgreSQL, MariaDB)"
    )
    parser.add_argument("--backends", default="kea,isc")
    parser.add_argument(
        "--burst",
        type=int,
        default=100,
        help="K concurrent changes on Kea without a hosts database, group commit on and off (0: skip)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    results: list[dict[str, Any]] = []
    with namespace() as (netns, interface):
        for size in sizes:
            workdir = Path(tempfile.mkdtemp(prefix="qrm-dhcp-bench-"))
            try:
                core = core_settings(workdir, size)
                for name in args.backends.split(","):
                    settings = dhcpd_settings(name, netns, interface, workdir)
                    results.append(
                        bench_backend(name, name, settings, core, size, args.repeat, args.changes, args.burst)
                    )
                    print(f"# {name} {size}: {json.dumps(results[-1])}", file=sys.stderr)
                if not args.no_db and "kea" in args.backends:
                    for kind in ("postgresql", "mysql"):
                        with hosts_database(kind, f"qrm_kea_bench_{os.getpid()}_{size}") as url:
                            if url is None:
                                continue
                            settings = dhcpd_settings(
                                "kea", netns, interface, workdir / kind, kea_hosts_database=url
                            )
                            label = f"kea+{'pgsql' if kind == 'postgresql' else 'mariadb'}"
                            results.append(
                                bench_backend("kea", label, settings, core, size, args.repeat, args.changes)
                            )
                            print(f"# {label} {size}: {json.dumps(results[-1])}", file=sys.stderr)
            finally:
                db.dispose_engines()
                shutil.rmtree(workdir, ignore_errors=True)

    machine = versions()
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}, "
          f"Python {machine['python']}, {machine['kea']}, ISC dhcpd {machine['dhcpd']}, load {machine['load']}")  # fmt: skip
    print()
    print(f"Full rewrite (median of {args.repeat}; read = qrm database, check = the real tool):")
    print()
    print(
        "| backend | resources | read | render | write | check | swap | hosts DB | **total, server down** "
        "| apply to running server | **total, server up** |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        off, live = r["offline"], r["live"]
        print(
            f"| {r['backend']} | {r['size']:,} | {fmt(off['read'])} | {fmt(off['render'])} | {fmt(off['write'])} | "
            f"{fmt(off['check'])} | {fmt(off['swap'])} | {fmt(off.get('hosts_db')) if 'pgsql' in r['backend'] or 'mariadb' in r['backend'] else '–'} | "
            f"**{fmt(off['total'])}** | {fmt(live.get('apply', 0) + live.get('hosts_db', 0))} | **{fmt(live['total'])}** |"
        )
    print()
    print(f"One change, as the resource hooks make it (median of {args.changes}):")
    print()
    print("| backend | path | resources | reserve one | release one |")
    print("|---|---|---:|---:|---:|")
    paths = {"kea": "config-set (config-test first)", "isc": "OMAPI", "kea+pgsql": "hosts database (PostgreSQL)",
             "kea+mariadb": "hosts database (MariaDB)"}  # fmt: skip
    for r in results:
        c = r["change"]
        print(
            f"| {r['backend']} | {paths[r['backend']]} | {r['size']:,} | {fmt(c['add'])} | {fmt(c['remove'])} |"
        )
    bursts = [r for r in results if "burst" in r]
    if bursts:
        print()
        print(f"A burst of {args.burst} changes at once (Kea without a hosts database; one thread each):")
        print()
        print(
            "| resources | change path | **all returned after** | config-sets | slowest caller | median caller "
            "| failed / missing in Kea | load |"
        )
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        names = {"on": "group commit", "off": "a rewrite per change, in turn",
                 "before": "previous code: a rewrite per change, overlapping"}  # fmt: skip
        for r in bursts:
            for mode in BURST_MODES:
                b = r["burst"][mode]
                print(
                    f"| {r['size']:,} | {names[mode]} | **{b['wall']:.2f} s** | {b['config_sets']} | "
                    f"{b['slowest']:.2f} s | {b['median']:.2f} s | {b['failed']} / {b['missing']} | {b['load']:.1f} |"
                )
            on = r["burst"]["on"]["wall"]
            print(
                f"| {r['size']:,} | ratio to group commit | off {r['burst']['off']['wall'] / on:.0f}x, "
                f"before {r['burst']['before']['wall'] / on:.0f}x | | | | | |"
            )
    out_dir = Path(__file__).resolve().parents[1] / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"dhcp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=1))
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
