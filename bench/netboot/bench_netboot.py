#!/usr/bin/env python3
"""Network boot benchmark: QEMU machines PXE-booting into qrm, in ``qrm lab``.

Each round builds a fresh lab (``qrm_core.lab.netlab.Lab``: a network namespace,
the real ``qrm server`` with qrm-dhcpd managing Kea or ISC dhcpd and qrm-tftpd,
QEMU under TCG with virtio-net and Debian's iPXE ROM) and measures:

* **power-on -> idle**, for N machines powered on at once: from starting QEMU
  to the resource's change to ``idle`` in the database, split into
  firmware + iPXE + DHCP (until the ``boot.ipxe`` TFTP request, from the
  server's log), kernel and initrd over HTTP + decompression (until the
  kernel's clock starts: registration time minus the guest's uptime on its
  console), and kernel + node agent (the guest's uptime at registration);
* **VE start -> active**: ``ve start web`` (the lab's ramdisk VE) until the
  machine chosen reports ``active`` (engine placement, the reboot order at the
  next heartbeat, reboot through firmware and iPXE, the root archive fetched
  and unpacked into RAM, the VE's start script);
* with ``--failover``: the machine running the VE is killed (SIGKILL to QEMU);
  **error -> active elsewhere** (failover proper: release, placement, reboot
  of the other machine) and kill -> active (adds the heartbeat timeout);
* **VE stop -> idle**: ``ve stop web`` until the machine registered idle again.

With ``--firmware uefi`` the machines run OVMF, whose own PXE client gets
``ipxe.efi`` over TFTP first; firmware + iPXE + DHCP is then split at that
request (OVMF and its DHCP; ``ipxe.efi`` loaded, started and its own DHCP).

Usage (root; from the repository root, in a virtualenv with qrm-core and the
qrm-tftpd, qrm-dhcpd and qrm-ramdisk plugins):

    sudo .venv/bin/python bench/netboot/bench_netboot.py                     # 3 rounds, 2 machines, Kea
    sudo .venv/bin/python bench/netboot/bench_netboot.py --dhcp kea,isc --rounds 3 --failover
    sudo .venv/bin/python bench/netboot/bench_netboot.py --vms 1 --firmware uefi  # OVMF (apt-get install ovmf)

Results: a Markdown table on stdout and JSON in bench/results/. The lab's
directory of each round is a temporary one, removed afterwards (``--keep``
keeps it: consoles, server and DHCP logs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qrm_core.errors import QrmError
from qrm_core.lab import netlab
from qrm_core.lab.netlab import Lab

RESULTS = Path(__file__).resolve().parents[1] / "results"


def utc(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (QrmError, KeyError, OSError):  # server busy, machine not registered yet, no console yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def resources(lab: Lab) -> dict[str, Any]:
    with lab.client() as client:
        return {r.mac: r for r in client.resource_list(None, None, None, 0, None).items}


def tftp_requests(log: Path, name: str = "boot.ipxe") -> list[tuple[float, str]]:
    """``(time, client ip)`` of every request for ``name`` in the server's log (local time stamps)."""
    found = []
    pattern = re.compile(
        r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .* tftp: ([0-9.]+):\d+ " + re.escape(name) + ": sending"
    )
    for line in log.read_text(errors="replace").splitlines():
        match = pattern.match(line)
        if match:
            stamp = (
                time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
            )
            found.append((stamp, match.group(3)))
    return found


def uptime_at_registration(console: str, mac: str, mode: str, nth: int = 1) -> float | None:
    hits = re.findall(
        rf"qrm-agent\[([0-9.]+)\]: registered as resource \d+ \(mac {re.escape(mac)}, mode {mode},", console
    )
    return float(hits[nth - 1]) if len(hits) >= nth else None


def one_round(args: argparse.Namespace, dhcp: str, kernel_deb: Path | None) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        figures.setdefault(key, []).append(round(value, 2))

    directory = Path(tempfile.mkdtemp(prefix="qrm-bench-lab-"))
    lab = Lab(directory / "lab")
    try:
        state = lab.up(
            vms=args.vms,
            dhcp=dhcp,
            cpus=args.cpus,
            memory_mb=args.memory,
            port=0,
            kernel_deb=kernel_deb,
            heartbeat_timeout=args.heartbeat_timeout,
            firmware=args.firmware,
        )
        macs = {spec.mac: name for name, spec in state.vms.items()}
        rows = wait(
            "every machine idle",
            lambda: (r := resources(lab)) and all(m in r and r[m].state == "idle" for m in macs) and r,
            240,
        )
        requests = tftp_requests(lab.data_dir / "logs" / "qrm.log")
        efi_requests = tftp_requests(lab.data_dir / "logs" / "qrm.log", "ipxe.efi")
        for mac, name in macs.items():
            row, on = rows[mac], state.powered_on[name]
            idle_at = utc(row.state_changed_at)
            note("power-on -> idle", idle_at - on)
            asked = [t for t, ip in requests if ip == row.ip and t >= on - 1]
            uptime = wait(
                "the console",
                lambda n=name, m=mac: uptime_at_registration(
                    lab.console_path(n).read_text(errors="replace"), m, "idle"
                ),
                10,
            )
            if asked:
                note("  firmware, iPXE, DHCP", asked[0] - on)
                efi = [t for t, ip in efi_requests if ip == row.ip and on - 1 <= t <= asked[0]]
                if efi:
                    note("    OVMF and its PXE DHCP (-> ipxe.efi requested)", efi[0] - on)
                    note("    ipxe.efi over TFTP, started, its DHCP (-> boot.ipxe)", asked[0] - efi[0])
                note("  kernel+initrd over HTTP, decompression", idle_at - uptime - asked[0])
            note("  kernel + node agent (guest uptime)", uptime)

        started = time.time()
        with lab.client() as client:
            client.ve_start(netlab.VE)
        ve = wait("the VE running", lambda: (lab_ve := _ve(lab)).state == "running" and lab_ve, 240)
        (member,) = ve.resources
        note("VE start -> active", utc(resources(lab)[member].state_changed_at) - started)

        if args.failover and len(macs) > 1:
            other = next(m for m in macs if m != member)
            killed = time.time()
            lab.vm_kill(macs[member])
            moved = wait(
                "failover",
                lambda: (r := resources(lab))[other].state == "active" and r[other].ve == netlab.VE and r,
                args.heartbeat_timeout + 240,
            )
            note("kill -> VE active on another machine", utc(moved[other].state_changed_at) - killed)
            note(
                "  error -> VE active on another machine",
                utc(moved[other].state_changed_at) - utc(moved[member].state_changed_at),
            )
            member = other

        vm = macs[member]
        before = lab.console_path(vm).read_text(errors="replace").count(f"(mac {member}, mode idle,")
        stopping = time.time()
        with lab.client() as client:
            client.ve_stop(netlab.VE)
        wait(
            "the machine idle again",
            lambda: (
                lab.console_path(vm).read_text(errors="replace").count(f"(mac {member}, mode idle,") > before
                and resources(lab)[member].state == "idle"
            ),
            240,
        )
        note("VE stop -> registered idle", time.time() - stopping)
    finally:
        lab.down()
        if args.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return figures


def _ve(lab: Lab) -> Any:
    with lab.client() as client:
        return client.ve_show(netlab.VE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vms", type=int, default=2, help="machines powered on at once per round")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--firmware", default="bios", help="bios (SeaBIOS) or uefi (OVMF)")
    parser.add_argument("--dhcp", default="kea", help="comma-separated: kea, isc")
    parser.add_argument("--failover", action="store_true", help="also kill the VE's machine")
    parser.add_argument("--heartbeat-timeout", type=float, default=netlab.DEFAULT_HEARTBEAT_TIMEOUT)
    parser.add_argument("--kernel-deb", type=Path, help="default: a cached one, or apt-get download")
    parser.add_argument("--keep", action="store_true", help="keep each round's lab directory")
    parser.add_argument("--json", type=Path, help="default: bench/results/netboot-<time>.json")
    args = parser.parse_args()
    netlab.check_root()
    _, kernel_deb = netlab.find_kernel(args.kernel_deb, None, lambda line: print(line, file=sys.stderr))
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[float]]] = {}
    for dhcp in [d.strip() for d in args.dhcp.split(",") if d.strip()]:
        merged: dict[str, list[float]] = {}
        for n in range(args.rounds):
            print(f"{dhcp}: round {n + 1}/{args.rounds}", file=sys.stderr)
            for key, values in one_round(args, dhcp, kernel_deb).items():
                merged.setdefault(key, []).extend(values)
        results[dhcp] = merged
    load_after = os.getloadavg()

    print(
        f"\nMachine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n"
        f"{args.rounds} rounds x {args.vms} machines ({args.cpus} CPUs, {args.memory} MB, TCG, virtio-net, "
        f"{args.firmware}), "
        f"heartbeat every {netlab.HEARTBEAT_INTERVAL:.0f} s, timeout {args.heartbeat_timeout:.0f} s\n"
    )
    for dhcp, figures in results.items():
        print(f"| {dhcp} | n | min | median | max |\n|---|---|---|---|---|")
        for key, values in figures.items():
            print(
                f"| {key} | {len(values)} | {min(values):.1f} s | {statistics.median(values):.1f} s | {max(values):.1f} s |"
            )
        print()
    target = args.json or RESULTS / f"netboot-{datetime.now():%Y%m%d-%H%M%S}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "kernel_deb": kernel_deb.name,
                "load_before": load_before,
                "load_after": load_after,
                "cpus": os.cpu_count(),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"raw figures: {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
