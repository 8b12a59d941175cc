"""qrm-vmware against vcsim: inventory sync beside a raw PropertyCollector retrieval, and partition creation.

    python bench/vmware/bench_inventory.py [--vms 1000] [--hosts 4] [--repeat 9] [--naive 100]
                                           [--partitions 100] [--json bench/results/vmware.json]

1. Inventory: vcsim with one cluster of ``--hosts`` ESXi hosts and ``--vms``
   VMs. In the same run, alternating, ``--repeat`` times each:

   * **raw**: pyVmomi alone, a separate session, reading the very
     properties qrm's sync reads (every host, cluster and VM: a ContainerView,
     RetrievePropertiesEx, ContinueRetrievePropertiesEx while paged,
     DestroyView) into plain dicts - the floor for any client;
   * **qrm sync**: ``qrm vmware sync`` as the server runs it
     (``qrm_vmware.sync.sync_connection``): the same read, then core's
     services update the host resources and check qrm's partitions (SQLite);
   * **naive** (once, for contrast): attribute access to the same VM
     properties (``vm.runtime.powerState``...), one Fetch each, for
     ``--naive`` VMs, extrapolated to all.

   Medians, the ratio qrm/raw (target <= 1.5) and qrm's time (target
   <= 0.5 s), and SOAP calls per run from vcsim's own counter.

2. Partition add: ``qrm partition add --host H --count N`` as core's
   service runs it with the vmware driver (each partition listed, created,
   started), ``--partitions`` of them on one ESXi host of the same vCenter
   (1,000 other VMs around); time and SOAP calls per VM.

vcsim is built (or found) as the tests do: ``QRM_TEST_VCSIM``, else a cached
build under ``QRM_TEST_VCSIM_CACHE`` (default ``.pytest_cache/d/qrm-vmware-vcsim``).
Needs qrm-core and qrm-vmware installed; everything it makes is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins" / "qrm_vmware" / "tests" / "vcsim"))

import vcsimkit  # noqa: E402


def raw_retrieval(content: Any, kinds: list[tuple[Any, tuple[str, ...]]], page: int) -> int:
    """Read every host, cluster and VM with the given properties into dicts; the number of objects."""
    from pyVmomi import vim, vmodl

    pc_ = vmodl.query.PropertyCollector
    view = content.viewManager.CreateContainerView(content.rootFolder, [k for k, _ in kinds], True)
    try:
        spec = pc_.FilterSpec(
            objectSet=[
                pc_.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[pc_.TraversalSpec(type=vim.view.ContainerView, path="view")],
                )
            ],
            propSet=[pc_.PropertySpec(type=k, pathSet=list(p)) for k, p in kinds],
        )
        collector = content.propertyCollector
        result = collector.RetrievePropertiesEx([spec], pc_.RetrieveOptions(maxObjects=page))
        rows = []
        while result is not None:
            rows.extend({p.name: p.val for p in o.propSet} for o in result.objects)
            result = collector.ContinueRetrievePropertiesEx(result.token) if result.token else None
        return len(rows)
    finally:
        view.Destroy()


def naive(content: Any, limit: int) -> tuple[int, int]:
    """Attribute access for ``limit`` VMs: (VMs read, VMs there are)."""
    from pyVmomi import vim

    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        vms = list(view.view)
        for vm in vms[:limit]:
            # the sync's VM properties (inventory.VM_PATHS), one Fetch each
            _ = (vm.runtime.powerState, vm.runtime.host, vm.config.annotation)
        return min(limit, len(vms)), len(vms)
    finally:
        view.Destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--naive", type=int, default=100, help="VMs read attribute by attribute")
    parser.add_argument("--partitions", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cache = Path(os.environ.get("QRM_TEST_VCSIM_CACHE") or ROOT / ".pytest_cache" / "d" / "qrm-vmware-vcsim")
    binary = vcsimkit.binary(cache)
    work = Path(tempfile.mkdtemp(prefix="qrm-bench-vmware-"))
    os.environ["QRM_DATA_DIR"] = str(work / "data")
    os.environ.pop("QRM_DATABASE_URL", None)
    os.environ.setdefault("QRM_INIT_BOOT_IMAGE", "false")

    from pyVim.connect import Disconnect, SmartConnect

    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem
    from qrm_core.services import service_context, setup
    from qrm_vmware import inventory, manage, sync, vsphere
    from qrm_vmware.settings import VmwareSettings

    settings = Settings()
    setup.init(settings, actor="bench", boot_image=False)
    plugins = PluginSystem(settings).load()
    vmware = VmwareSettings()
    results: dict[str, Any] = {"vms": args.vms, "hosts": args.hosts, "repeat": args.repeat}
    sim = vcsimkit.start(
        binary, "-cluster", "1", "-host", str(args.hosts), "-standalone-host", "0", "-vm", str(args.vms)
    )
    try:
        with service_context(settings, plugins=plugins, actor="bench") as ctx:
            manage.connect(
                ctx, name="vc1", url=sim.url, username=sim.username, password=sim.password, insecure=True
            )
        first = sync.sync_connection(settings, "vc1", plugins=plugins, settings=vmware)
        print(f"first sync: {first.summary()}")
        si = SmartConnect(
            protocol="https",
            host=sim.host,
            port=sim.port,
            user=sim.username,
            pwd=sim.password,
            sslContext=ssl._create_unverified_context(),
        )
        content = si.RetrieveContent()  # once, as qrm's session does at login
        kinds = list(inventory.KINDS)
        raw_times, qrm_times = [], []
        raw_calls = qrm_calls = None
        for _ in range(args.repeat):
            sim.reset_calls()
            started = time.perf_counter()
            objects = raw_retrieval(content, kinds, vmware.page_size)
            raw_times.append(time.perf_counter() - started)
            raw_calls = sim.soap_calls()
            sim.reset_calls()
            started = time.perf_counter()
            result = sync.sync_connection(settings, "vc1", plugins=plugins, settings=vmware)
            qrm_times.append(time.perf_counter() - started)
            qrm_calls = sim.soap_calls()
            assert result.vms == args.vms
        raw_median, qrm_median = statistics.median(raw_times), statistics.median(qrm_times)
        sim.reset_calls()
        started = time.perf_counter()
        read, total = naive(content, args.naive)
        naive_time = time.perf_counter() - started
        naive_calls = sim.soap_calls()
        results["inventory"] = {
            "objects": objects,
            "raw_s": raw_times,
            "qrm_s": qrm_times,
            "raw_median_s": raw_median,
            "qrm_median_s": qrm_median,
            "ratio": qrm_median / raw_median,
            "raw_calls": raw_calls,
            "qrm_calls": qrm_calls,
            "naive_vms": read,
            "naive_s": naive_time,
            "naive_calls": naive_calls,
            "naive_extrapolated_s": naive_time / read * total,
        }
        print(
            f"inventory of {total} VMs on {args.hosts} hosts ({objects} objects), median of {args.repeat}:\n"
            f"  raw PropertyCollector  {raw_median * 1000:7.1f} ms  {raw_calls['total']} SOAP calls\n"
            f"  qrm sync               {qrm_median * 1000:7.1f} ms  {qrm_calls['total']} SOAP calls  "
            f"({qrm_median / raw_median:.2f}x raw)\n"
            f"  naive attributes       {naive_time / read * total:7.1f} s   "
            f"{naive_calls['total'] / read * total:.0f} SOAP calls (measured on {read} VMs: {naive_time:.2f} s, "
            f"{naive_calls['total']} calls)"
        )
        Disconnect(si)

        # -- partition add ------------------------------------------------------
        # What 'qrm partition add --host H --count N' runs (core's service, the
        # vmware driver): N partitions recorded, then each listed, created and
        # started. qrm's capacity rule counts CPUs x QRM_CPU_OVERCOMMIT; vcsim's
        # hosts have 2 CPUs, so the benchmark raises the ratio to fit N.
        from qrm_core.services import partitions as partition_services

        host = "DC0-C0-H0"
        ratio = settings.model_copy(
            update={"cpu_overcommit": float(args.partitions), "memory_overcommit": 8.0}
        )
        plugins.use_settings(ratio)
        sim.reset_calls()
        started = time.perf_counter()
        with service_context(ratio, plugins=plugins, actor="bench") as ctx:
            made = partition_services.add_partitions(
                ctx, host=host, cpus=1, memory_mb=32, count=args.partitions, prefix="bench"
            )
        add_time = time.perf_counter() - started
        add_calls = sim.soap_calls()
        assert len(made) == args.partitions and all(p.state == "running" for p in made)
        per_method = {k: round(v / args.partitions, 2) for k, v in sorted(add_calls["methods"].items())}
        results["partition_add"] = {
            "partitions": args.partitions,
            "seconds": add_time,
            "per_vm_ms": add_time / args.partitions * 1000,
            "calls": add_calls,
            "calls_per_vm": add_calls["total"] / args.partitions,
        }
        print(
            f"qrm partition add --host {host} --count {args.partitions}: {add_time:.2f} s, "
            f"{add_time / args.partitions * 1000:.1f} ms and {add_calls['total'] / args.partitions:.1f} "
            f"SOAP calls per VM: {per_method}"
        )
        with service_context(ratio, plugins=plugins, actor="bench") as ctx:
            for partition in made:
                partition_services.remove_partition(ctx, partition.name)
    finally:
        vsphere.POOL.close()
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
