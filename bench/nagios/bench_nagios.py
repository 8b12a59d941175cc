#!/usr/bin/env python3
"""Nagios benchmark: full render + check + swap, one change, and reading the status,
at 100 / 1,000 / 10,000 resources (one VE per 10 resources), with the real Nagios 4.

What it measures, per size (run as root: the Nagios runs in a network
namespace this script creates, with only a loopback, and with active checks
switched off, so nothing is sent anywhere; the namespace is deleted at the end):

* **full sync, cold**: every object of an empty object directory, as ``qrm
  nagios sync`` and ``qrm server``'s start do it: read qrm's database (SQLite),
  render every file, write them (``*.cfg.new``), check with ``nagios4 -v`` on
  the candidate configuration, rename into place; each step and the total;
* **full sync, nothing changed**: the same when every file is already right
  (read, render, compare; no check, no reload);
* **Nagios's own -v**: ``nagios4 -v`` alone on the finished configuration,
  the part of the check that is Nagios's and not the plugin's;
* **one change**: one resource's address changes; *render* is what the hook's
  path does before Nagios is involved (read that one resource and its VE,
  render its file); *apply* is write + ``nagios4 -v`` + rename (the check
  reads the whole configuration, so it grows with N by Nagios's nature);
* **status**: the plugin parsing a ``status.dat`` written by that Nagios with
  every host and service (a result was submitted for every host and every
  passive service, so no block is pending), median of 5 cold parses; and
  the look-up of one host (``qrm resource show``).

Usage (from the repository root, in a virtualenv with qrm-core and qrm-nagios):

    sudo .venv/bin/python bench/nagios/bench_nagios.py                  # 100, 1000, 10000
    sudo .venv/bin/python bench/nagios/bench_nagios.py --sizes 10000 --repeat 1

Results: a Markdown table on stdout and JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from qrm_core import db
from qrm_core.config import Settings
from qrm_core.services import setup
from qrm_nagios import control, nagioscfg, render, sync
from qrm_nagios.settings import NagiosSettings
from qrm_nagios.status import StatusReader
from qrm_nagios.store import ObjectStore
from qrm_nagios.sync import Changes

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
PER_VE = 10


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    version = subprocess.run(["nagios4", "--version"], capture_output=True, text=True, check=False).stdout
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nagios": next((line for line in version.splitlines() if line.startswith("Nagios Core")), "?"),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def fill(core: Settings, count: int) -> None:
    """``count`` resources with addresses, in ``count / 10`` shared VEs of 10, on one NFS server."""
    engine = db.get_engine(core)
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO storage_server (name, type, address, comment, created_at) "
                "VALUES ('nfs1', 'nfs', '10.99.255.1', '', :now)"
            ),
            {"now": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO filesystem_image (name, storage_id, location, origin, state, comment, created_at) "
                "VALUES ('root', 1, '/exports/root', 'imported', 'ready', '', :now)"
            ),
            {"now": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO boot_image (name, kernel_version, cmdline, comment, created_at) "
                "VALUES ('idle', '6.1', '', '', :now)"
            ),
            {"now": now},
        )
        ves = [
            {"name": f"ve{i:04d}", "now": now, "monitor": json.dumps(["http:80", "tcp:22"])}
            for i in range(count // PER_VE)
        ]
        conn.execute(
            sa.text(
                "INSERT INTO virtual_environment (name, boot_image_id, fs_image_id, deployment, req_cpus, "
                "req_memory_mb, pool_size, failover, monitor, monitor_failover, kernel_args, desired_state, "
                "state, problem, generation, comment, created_at, updated_at) VALUES (:name, 1, 1, 'shared', "
                "0, 0, 10, 1, :monitor, 0, '', 'running', 'running', '', 1, '', :now, :now)"
            ),
            ves,
        )
        rows = [
            {
                "mac": f"52:54:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}",
                "ip": f"10.99.{i // 250}.{i % 250 + 1}",
                "hostname": f"node{i:05d}",
                "ve": i // PER_VE + 1,
                "now": now,
            }
            for i in range(count)
        ]
        conn.execute(
            sa.text(
                "INSERT INTO resource (mac, ip, hostname, kind, capabilities, cpus, memory_mb, state, ve_id, "
                "boot_generation, booted_generation, last_seen, state_changed_at, comment, created_at) VALUES "
                "(:mac, :ip, :hostname, 'physical', '[]', 2, 2048, 'active', :ve, 1, 1, :now, :now, '', :now)"
            ),
            rows,
        )


@contextmanager
def namespace() -> Iterator[str]:
    name = f"qrmbn{os.getpid()}"[:15]
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nagios_config(settings: NagiosSettings, core: Settings) -> Path:
    """A Nagios of our own, driven as an existing one: the managed configuration with active checks off."""
    managed = settings.model_copy(update={"manage": True, "main_config": None})
    paths = managed.paths(core)
    from qrm_nagios.service import prepare_managed

    prepare_managed(managed, core)
    assert paths.main_config is not None
    text = nagioscfg.managed_config(managed, paths)
    text = text.replace("execute_service_checks=1", "execute_service_checks=0")
    text = text.replace("execute_host_checks=1", "execute_host_checks=0")
    text = text.replace("check_service_freshness=1", "check_service_freshness=0")
    path = paths.state_dir / "bench-nagios.cfg"
    path.write_text(text)
    return path


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def cpu_timed(fn: Any) -> tuple[float, float, Any]:
    """Wall and CPU seconds of ``fn``. CPU counts this process and the children it
    waited for (``nagios4 -v``), not other work on a shared machine; on an idle
    machine the two agree."""
    wall, cpu = time.perf_counter(), _cpu()
    value = fn()
    return time.perf_counter() - wall, _cpu() - cpu, value


def one_size(count: int, repeat: int, netns: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="qrmbn"))
    work.chmod(0o755)
    proc: subprocess.Popen[bytes] | None = None
    try:
        core = Settings(data_dir=work, database_url=f"sqlite:///{work / 'qrm.db'}", actor="bench")
        setup.init(core, admin_password=None)
        fill(core, count)
        state = work / "nagios"
        base = NagiosSettings(manage=True, state_dir=state)
        main = nagios_config(base, core)
        settings = NagiosSettings(
            main_config=main,
            state_dir=state,
            command_file=state / "rw" / "nagios.cmd",
            status_file=state / "var" / "status.dat",
        )
        store = ObjectStore(settings, core)
        result: dict[str, Any] = {"resources": count, "ves": count // PER_VE}

        # Full sync into an empty directory, then with nothing to change.
        cold: list[dict[str, float]] = []
        for _ in range(repeat):
            shutil.rmtree(store.root, ignore_errors=True)
            seconds, cpu, outcome = cpu_timed(lambda: sync.full_sync(settings, core, reload=False))
            timings = dict(outcome.report.timings)
            timings["wall"] = seconds
            timings["cpu"] = cpu
            cold.append(timings)
            files = len(outcome.rendered.files)
        result["files"] = files
        result["full_cold"] = {k: statistics.median(t.get(k, 0.0) for t in cold) for k in cold[0]}
        warm = [timed(lambda: sync.full_sync(settings, core, reload=False))[0] for _ in range(repeat)]
        result["full_unchanged"] = statistics.median(warm)

        # Reference: the file system's own cost of writing and renaming as many
        # files of the same sizes (plain open/write/close, then rename), no qrm.
        texts = [store.read(rel) or "" for rel in store.files()]
        reference = []
        for _ in range(repeat):
            scratch = work / "reference"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            started = time.perf_counter()
            for index, text in enumerate(texts):
                with open(scratch / f"{index}.cfg.new", "w") as handle:
                    handle.write(text)
            for index in range(len(texts)):
                os.replace(scratch / f"{index}.cfg.new", scratch / f"{index}.cfg")
            reference.append(time.perf_counter() - started)
        shutil.rmtree(work / "reference", ignore_errors=True)
        result["files_reference"] = statistics.median(reference)

        # Nagios's own -v on the same configuration.
        verify, verify_cpu = [], []
        for _ in range(repeat):
            wall, cpu, _done = cpu_timed(
                lambda: subprocess.run(["nagios4", "-v", str(main)], capture_output=True, check=True)
            )
            verify.append(wall)
            verify_cpu.append(cpu)
        result["nagios_v"] = statistics.median(verify)
        result["nagios_v_cpu"] = statistics.median(verify_cpu)

        # One change: a resource's address.
        render_times, render_cpu, apply_times = [], [], []
        engine = db.get_engine(core)
        for i in range(max(repeat, 30)):
            with engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE resource SET ip = :ip WHERE id = 1"), {"ip": f"10.98.0.{i % 250 + 1}"}
                )
            changes = Changes(resources={1})
            wall, cpu, (desired, _rendered) = cpu_timed(
                lambda c=changes: sync.render_changes(settings, core, c)
            )
            render_times.append(wall)
            render_cpu.append(cpu)
            assert list(desired) == [render.host_path(1)]
            assert f"10.98.0.{i % 250 + 1}\n" in (desired[render.host_path(1)] or "")
            if i < max(repeat, 5):
                seconds, report = timed(lambda d=desired: store.apply(d, reload=False))
                assert report.written == [render.host_path(1)], report.to_dict()
                apply_times.append(seconds)
        result["change_render"] = statistics.median(render_times)
        result["change_render_min"] = min(render_times)
        result["change_render_cpu"] = statistics.median(render_cpu)
        result["change_apply"] = statistics.median(apply_times)

        # A status.dat with every host and service, written by Nagios itself.
        out = open(work / "nagios.out", "wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "nagios4", str(main)], stdout=out, stderr=subprocess.STDOUT
        )
        pipe = state / "rw" / "nagios.cmd"
        deadline = time.monotonic() + 120
        while not control.reader_present(pipe):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "nagios.out").read_text()[-2000:])
            time.sleep(0.1)
        now = time.time()
        lines = []
        for name in list(_host_names(store)):
            lines.append(control.command("PROCESS_HOST_CHECK_RESULT", name, 0, "PING OK - bench", now=now))
        lines += _service_results(store, now)
        control.send(pipe, lines, timeout=300)
        status_path = state / "var" / "status.dat"
        expected = len(lines)
        deadline = time.monotonic() + 300
        while True:
            data = status_path.read_bytes() if status_path.exists() else b""
            checked = data.count(b"\thas_been_checked=1\n")
            if checked >= expected:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {checked} of {expected} results in status.dat")
            time.sleep(0.5)
        time.sleep(1.5)  # one more status write with every result in it
        parses, parses_cpu = [], []
        for _ in range(5):
            reader = StatusReader(status_path)
            seconds, cpu, status = cpu_timed(reader.read)
            parses.append(seconds)
            parses_cpu.append(cpu)
        assert status is not None and len(status.hosts) >= count
        result["status_hosts"] = len(status.hosts)
        result["status_services"] = sum(len(h.services) for h in status.hosts.values())
        result["status_bytes"] = status_path.stat().st_size
        result["status_parse"] = statistics.median(parses)
        result["status_parse_cpu"] = statistics.median(parses_cpu)
        single = [timed(lambda: StatusReader(status_path).host("node00001"))[0] for _ in range(5)]
        result["status_one_host"] = statistics.median(single)
        return result
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        db.dispose_engines()
        shutil.rmtree(work, ignore_errors=True)


def _host_names(store: ObjectStore) -> Iterator[str]:
    for rel in store.files():
        kind = None
        for line in (store.read(rel) or "").splitlines():
            parts = line.split()
            if parts[:1] == ["define"]:
                kind = parts[1]
            elif kind == "host" and len(parts) == 2 and parts[0] == "host_name":
                yield parts[1]


def _service_results(store: ObjectStore, now: float) -> list[str]:
    lines = []
    for rel in store.files():
        host = None
        for line in (store.read(rel) or "").splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0] == "host_name":
                host = parts[1]
            elif len(parts) == 2 and parts[0] == "service_description" and host:
                lines.append(
                    control.command("PROCESS_SERVICE_CHECK_RESULT", host, parts[1], 0, "OK - bench", now=now)
                )
    return lines


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the Nagios runs in a network namespace of its own)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    info = machine()
    results = []
    with namespace() as netns:
        for count in sizes:
            print(f"... {count} resources", file=sys.stderr)
            results.append(one_size(count, args.repeat, netns))
    info["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(f"machine: {info}")
    print()
    print(
        "| resources | VEs | files | read | render | write | check (-v) | swap | **full sync, cold** "
        "| its CPU | nothing changed | Nagios's own -v (CPU) | reference: write + rename as many files |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        c = r["full_cold"]
        print(
            f"| {r['resources']:,} | {r['ves']:,} | {r['files']:,} | {ms(c.get('read', 0))} | "
            f"{ms(c.get('render', 0))} | {ms(c.get('write', 0))} | {ms(c.get('check', 0))} | "
            f"{ms(c.get('swap', 0))} | **{ms(c['wall'])}** | {ms(c['cpu'])} | {ms(r['full_unchanged'])} | "
            f"{ms(r['nagios_v'])} ({ms(r['nagios_v_cpu'])}) | {ms(r['files_reference'])} |"
        )
    print()
    print(
        "| resources | one change: render, CPU | wall (median / min) | write + -v + rename "
        "| status.dat | hosts / services | parse all, CPU | wall | one host |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['resources']:,} | **{ms(r['change_render_cpu'])}** | {ms(r['change_render'])} / "
            f"{ms(r['change_render_min'])} | {ms(r['change_apply'])} | "
            f"{r['status_bytes'] / 1e6:.1f} MB | {r['status_hosts']:,} / {r['status_services']:,} | "
            f"**{ms(r['status_parse_cpu'])}** | {ms(r['status_parse'])} | {ms(r['status_one_host'])} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"nagios-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    print(f"\nJSON: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
