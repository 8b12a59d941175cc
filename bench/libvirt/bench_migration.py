"""Where a live migration's time goes: real QEMU (TCG) between two private libvirtds (docs/benchmarks.md).

Starts two libvirt daemons (``qrm_core.lab.libvirtd``, as the lab's hosts hv1 and
hv2) in a network namespace of its own, defines and starts one TCG guest
(``--memory`` MiB, diskless: SeaBIOS idles), then migrates it back and forth
``--rounds`` times for each variant with ``migrate3`` (what qrm's managed mode
calls), the stream over the namespace's loopback. For each migration it prints the
wall time of the call and libvirt's completed-job statistics read on the
destination (``virsh domjobinfo --completed``: total, setup, downtime, data).

Variants (``--variants``, comma separated; each is a flag set and parameters):

* ``default``: LIVE | PERSIST_DEST | UNDEFINE_SOURCE, ``VIR_MIGRATE_PARAM_URI`` only
  (what qrm did before).
* ``transient``: LIVE only (no define on the destination, no undefine on the source).
* ``autoconv``: default + ``VIR_MIGRATE_AUTO_CONVERGE``.
* ``downtime1s``: default + ``migrateSetMaxDowntime(1000)`` before the move.
* ``parallel``: default + ``VIR_MIGRATE_PARALLEL`` (multifd, 2 connections).
* ``compressed``: default + ``VIR_MIGRATE_COMPRESSED`` (xbzrle).
* ``p2p``: default through ``migrateToURI3`` + ``VIR_MIGRATE_PEER2PEER``.
* ``qrm``: the driver's own call (``qrm_libvirt.migration.LibvirtMigrator``) with the
  plugin's default settings.

The daemons run under qrm_core.lab.libvirtd's reaper, as in the lab (without it,
where PID 1 reaps late, each call took about 1.4 s more: libvirt waits for the
source QEMU's zombie).

Run as root (the daemons run QEMU as root in their own mount namespace):
``python bench/libvirt/bench_migration.py --rounds 3 --variants default,transient``;
``--kernel K --initrd I`` boots a Linux guest whose init fills memory and says READY
on its console (the figures in docs/benchmarks.md: Debian's cloud kernel and a busybox
initrd whose init writes 96 MiB into a tmpfs, then 256 KiB every second).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from qrm_core.lab.libvirtd import LibvirtDaemon

libvirt.registerErrorHandler(lambda _c, _e: None, None)
L = libvirt

DOMAIN = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>{memory}</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
<features><acpi/></features><clock offset='utc'/>
<devices><memballoon model='virtio'/><serial type='file'><target port='0'/><source path='{log}'/></serial></devices></domain>"""
LINUX = "<kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>console=ttyS0 quiet</cmdline></os>"

BASE = L.VIR_MIGRATE_LIVE | L.VIR_MIGRATE_PERSIST_DEST | L.VIR_MIGRATE_UNDEFINE_SOURCE


def migrate(variant: str, dom: Any, dst: Any, dst_uri: str) -> None:
    params: dict[str, Any] = {L.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1"}
    flags = BASE
    if variant == "transient":
        flags = L.VIR_MIGRATE_LIVE
    elif variant == "autoconv":
        flags |= L.VIR_MIGRATE_AUTO_CONVERGE
    elif variant == "parallel":
        flags |= L.VIR_MIGRATE_PARALLEL
        params[L.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = 2
    elif variant == "compressed":
        flags |= L.VIR_MIGRATE_COMPRESSED
    elif variant == "downtime1s":
        dom.migrateSetMaxDowntime(1000, 0)  # held by the source QEMU during the move
    if variant == "p2p":
        dom.migrateToURI3(dst_uri, params, flags | L.VIR_MIGRATE_PEER2PEER)
    elif variant == "qrm":
        from qrm_libvirt.migration import LibvirtMigrator, MigrationRequest

        LibvirtMigrator().migrate(
            MigrationRequest(
                domain=dom,
                source=None,
                destination=dst,
                destination_uri=dst_uri,
                live=True,
                migrate_uri="tcp://127.0.0.1",
            )
        )
    else:
        dom.migrate3(dst, params, flags)


def stats(dom: Any) -> dict[str, Any]:
    try:
        return dict(dom.jobStats(L.VIR_DOMAIN_JOB_STATS_COMPLETED))
    except L.libvirtError as exc:
        return {"error": exc.get_error_message()}


def destroy_time(conn: Any, memory: int) -> float:
    """Seconds ``destroy`` takes on a freshly started guest."""
    dom = conn.createXML(DOMAIN.format(name="destroyprobe", memory=memory, log="/dev/null"), 0)
    time.sleep(1)
    t = time.perf_counter()
    dom.destroy()
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", type=int, default=256, help="guest MiB")
    parser.add_argument("--variants", default="default,transient,autoconv,downtime1s,parallel,p2p,qrm")
    parser.add_argument(
        "--kernel", help="boot this Linux kernel (with --initrd) instead of idling in SeaBIOS"
    )
    parser.add_argument("--initrd", help="its initrd; the guest is ready when its console says READY")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds the guest runs before each move")
    args = parser.parse_args()
    netns = f"qrmmig{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    top = Path(tempfile.mkdtemp(prefix="qrm-migbench-"))
    daemons = [LibvirtDaemon(top / n, netns=netns) for n in ("hv1", "hv2")]
    results: dict[str, list[float]] = {}
    try:
        for d in daemons:
            d.start()
        t = time.perf_counter()
        conns = [L.open(d.uri) for d in daemons]
        print(f"open both connections: {time.perf_counter() - t:.3f} s")
        print(f"destroy of a running guest: {destroy_time(conns[1], args.memory):.3f} s")
        name = "migbench"
        xml = DOMAIN.format(name=name, memory=args.memory, log=top / "console.log")
        if args.kernel:
            xml = xml.replace(
                "<boot dev='network'/></os>", LINUX.format(kernel=args.kernel, initrd=args.initrd)
            )
        conns[0].defineXML(xml)
        conns[0].lookupByName(name).create()
        t = time.perf_counter()
        while args.kernel and "READY" not in (top / "console.log").read_text(errors="replace"):
            if time.perf_counter() - t > 300:
                raise SystemExit("the guest did not say READY within 300 s")
            time.sleep(0.5)
        print(f"guest ready after {time.perf_counter() - t:.1f} s")
        here = 0
        print(f"load average: {os.getloadavg()}")
        for variant in args.variants.split(","):
            for _ in range(args.rounds):
                time.sleep(args.settle)
                src, dst = conns[here], conns[1 - here]
                dom = src.lookupByName(name)
                t = time.perf_counter()
                try:
                    migrate(variant, dom, dst, daemons[1 - here].uri)
                except L.libvirtError as exc:
                    print(f"{variant}: ERROR {exc.get_error_message()}")
                    break
                took = time.perf_counter() - t
                moved = dst.lookupByName(name)
                s = stats(moved)
                results.setdefault(variant, []).append(took)
                print(
                    f"{variant:11s} hv{here + 1}->hv{2 - here}: call {took:.3f} s; "
                    f"total {s.get('time_elapsed', '?')} ms, setup {s.get('setup_time', '?')} ms, "
                    f"downtime {s.get('downtime', '?')} ms, data {s.get('data_processed', 0) // 1024} KiB, "
                    f"memory {s.get('memory_processed', 0) // 1024} KiB, iterations {s.get('memory_iteration', '?')}, "
                    f"zero pages {s.get('memory_zero', '?')}, persistent={moved.isPersistent()}"
                )
                if (
                    variant == "transient"
                ):  # the source keeps its definition: make it persistent again where it is
                    src_def = [d for d in src.listAllDomains() if d.name() == name]
                    for d in src_def:
                        d.undefine()
                    dst.defineXML(moved.XMLDesc(L.VIR_DOMAIN_XML_INACTIVE | L.VIR_DOMAIN_XML_MIGRATABLE))
                here = 1 - here
        print("\nmedian wall time of the call per variant:")
        for variant, times in results.items():
            print(
                f"  {variant:11s} {statistics.median(times):.3f} s  ({', '.join(f'{x:.2f}' for x in times)})"
            )
        print(f"load average at the end: {os.getloadavg()}")
    finally:
        for d in daemons:
            d.stop()
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
