"""qrm's libvirt driver beside raw libvirt-python, on libvirt's test driver (docs/benchmarks.md).

Each phase runs the same work twice in one process, once through raw libvirt-python
calls and once through ``qrm_qemu.driver.QemuHypervisor``, on a fresh test-driver
host (a node file: state private to the connection), alternating raw and driver
over ``--rounds`` rounds; the median of each is reported with the ratio
driver/raw in operations per second (>= 0.7x is the target).

* ``lifecycle``: define + start + destroy + undefine, N partitions. Raw: the XML the
  driver renders, ``defineXMLFlags(VALIDATE)``, ``create``, ``destroy``, ``undefineFlags``.
* ``list``: every partition with its state, memory and vCPUs, N running. Raw:
  ``listAllDomains()`` and ``name()``/``info()`` of each (what a script needs for
  the same facts); driver: ``list_partitions`` (one ``getAllDomainStats`` sweep).
* ``pause``: suspend + resume of N partitions by name. Raw: ``lookupByName``,
  ``state`` (pausing a paused partition is refused, as the driver does) and
  ``suspend``, then the same with ``resume``; driver: ``pause_partition`` +
  ``unpause_partition``.
* ``memory``: set the memory of N running partitions, live and persistent, by name.
  Raw: ``lookupByName``, ``isActive`` (live applies to a running one only),
  ``setMemoryFlags(LIVE)``, ``setMemoryFlags(CONFIG)`` (the test driver refuses both
  flags at once); driver: ``set_memory``.
* ``inventory``: the driver's sweep over N partitions, counting libvirt calls.

Usage: python bench/libvirt/bench_driver.py [--n 1000] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from qrm_core.plugin_api import HostTarget, PartitionSpec, Settings
from qrm_libvirt import domxml
from qrm_libvirt.connections import pool
from qrm_libvirt.testing import test_host
from qrm_qemu.driver import QemuHypervisor

libvirt.registerErrorHandler(lambda _c, _e: None, None)
VALIDATE = libvirt.VIR_DOMAIN_DEFINE_VALIDATE
UNDEFINE = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA


class Bench:
    def __init__(self, n: int, directory: Path) -> None:
        self.n = n
        self.dir = directory
        self.driver = QemuHypervisor(Settings(data_dir=directory / "data"))
        self.count = 0

    def host(self) -> HostTarget:
        self.count += 1
        return test_host(
            self.dir / "hosts", f"hv{self.count}", resource_id=self.count, cpus=8, memory_mb=1 << 22
        )

    def spec(self, i: int) -> PartitionSpec:
        return PartitionSpec(
            f"p{i:05d}",
            cpus=1,
            memory_mb=64,
            mac=f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}",
            max_cpus=2,
            max_memory_mb=128,
        )

    def xmls(self, host: HostTarget, conn: Any) -> list[str]:
        return [domxml.render(self.driver.definition(host, conn, self.spec(i))) for i in range(self.n)]

    def populate(self, host: HostTarget) -> None:
        conn = pool().get(host.uri, host.label)
        for xml in self.xmls(host, conn):
            conn.defineXMLFlags(xml, VALIDATE).create()

    # -- phases: each returns seconds for N operations --------------------------------

    def lifecycle_raw(self) -> float:
        host = self.host()
        conn = pool().get(host.uri, host.label)
        xmls = self.xmls(host, conn)
        start = time.perf_counter()
        for xml in xmls:
            dom = conn.defineXMLFlags(xml, VALIDATE)
            dom.create()
            dom.destroy()
            dom.undefineFlags(UNDEFINE)
        return time.perf_counter() - start

    def lifecycle_driver(self) -> float:
        host, d = self.host(), self.driver
        specs = [self.spec(i) for i in range(self.n)]
        start = time.perf_counter()
        for spec in specs:
            d.create_partition(host, spec)
            d.start_partition(host, spec.name)
            d.destroy_partition(host, spec.name)
        return time.perf_counter() - start

    def list_raw(self, host: HostTarget, repeat: int = 5) -> float:
        conn = pool().get(host.uri, host.label)
        start = time.perf_counter()
        for _ in range(repeat):
            found = [(dom.name(), dom.info()) for dom in conn.listAllDomains()]
        assert len(found) == self.n
        return (time.perf_counter() - start) / repeat

    def list_driver(self, host: HostTarget, repeat: int = 5) -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            found = self.driver.list_partitions(host)
        assert len(found) == self.n
        return (time.perf_counter() - start) / repeat

    def pause_raw(self, host: HostTarget) -> float:
        conn = pool().get(host.uri, host.label)
        names = [self.spec(i).name for i in range(self.n)]
        start = time.perf_counter()
        paused = libvirt.VIR_DOMAIN_PAUSED
        for name in names:
            dom = conn.lookupByName(name)
            if dom.state()[0] != paused:
                dom.suspend()
            dom = conn.lookupByName(name)
            if dom.state()[0] == paused:
                dom.resume()
        return time.perf_counter() - start

    def pause_driver(self, host: HostTarget) -> float:
        names = [self.spec(i).name for i in range(self.n)]
        start = time.perf_counter()
        for name in names:
            self.driver.pause_partition(host, name)
            self.driver.unpause_partition(host, name)
        return time.perf_counter() - start

    def memory_raw(self, host: HostTarget) -> float:
        conn = pool().get(host.uri, host.label)
        names = [self.spec(i).name for i in range(self.n)]
        live, config = libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG
        start = time.perf_counter()
        for name in names:
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.setMemoryFlags(96 * 1024, live)
            dom.setMemoryFlags(96 * 1024, config)
        return time.perf_counter() - start

    def memory_driver(self, host: HostTarget) -> float:
        names = [self.spec(i).name for i in range(self.n)]
        start = time.perf_counter()
        for name in names:
            self.driver.set_memory(host, name, 96)
        return time.perf_counter() - start


def median_pair(raw: list[float], drv: list[float], n: int) -> dict[str, float]:
    r, d = statistics.median(raw), statistics.median(drv)
    return {"raw_s": r, "driver_s": d, "raw_per_s": n / r, "driver_per_s": n / d, "ratio": r / d}


def count_calls(bench: Bench, host: HostTarget) -> dict[str, int]:
    """libvirt calls one inventory sweep makes (after the first, which reads each XML once)."""
    bench.driver.list_partitions(host)
    counts: dict[str, int] = {}
    originals = {}
    for cls, names in (
        (libvirt.virConnect, ("getAllDomainStats", "listAllDomains", "lookupByName")),
        (libvirt.virDomain, ("XMLDesc", "info", "state")),
    ):
        for name in names:
            original = getattr(cls, name)
            originals[(cls, name)] = original

            def wrapped(self, *a, _o=original, _n=name, **k):
                counts[_n] = counts.get(_n, 0) + 1
                return _o(self, *a, **k)

            setattr(cls, name, wrapped)
    try:
        bench.driver.list_partitions(host)
    finally:
        for (cls, name), original in originals.items():
            setattr(cls, name, original)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("QRM_QEMU_SHUTDOWN_TIMEOUT", "0")
    with tempfile.TemporaryDirectory(prefix="qrm-bench-libvirt-") as tmp:
        bench = Bench(args.n, Path(tmp))
        results: dict[str, Any] = {
            "n": args.n,
            "rounds": args.rounds,
            "libvirt": libvirt.getVersion(),
            "python": platform.python_version(),
            "load": os.getloadavg(),
        }
        raw: list[float] = []
        drv: list[float] = []
        for _ in range(args.rounds):
            raw.append(bench.lifecycle_raw())
            drv.append(bench.lifecycle_driver())
        results["lifecycle"] = median_pair(raw, drv, args.n)
        host = bench.host()
        bench.populate(host)
        for phase in ("list", "pause", "memory"):
            raw, drv = [], []
            for _ in range(args.rounds):
                raw.append(getattr(bench, f"{phase}_raw")(host))
                drv.append(getattr(bench, f"{phase}_driver")(host))
            results[phase] = median_pair(raw, drv, args.n)
        results["inventory_calls"] = count_calls(bench, host)
        results["load_after"] = os.getloadavg()
    for phase in ("lifecycle", "list", "pause", "memory"):
        r = results[phase]
        unit = "sweeps" if phase == "list" else "ops"
        per = (lambda x: 1 / x) if phase == "list" else (lambda x: args.n / x)
        print(
            f"{phase:10s} raw {per(r['raw_s']):10.0f} {unit}/s   driver {per(r['driver_s']):10.0f} {unit}/s"
            f"   ratio {r['ratio']:.2f}x",
            flush=True,
        )
    print("inventory sweep of", args.n, "partitions: libvirt calls", results["inventory_calls"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
