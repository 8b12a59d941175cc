#!/usr/bin/env python3
"""Network roots benchmark: VEs booting from NFS and iSCSI beside the RAM-archive root,
read throughput inside a guest beside the same storage read from the host, and exports
in one batch beside one at a time.

``boot`` (needs what ``qrm lab`` needs, plus nfs-ganesha, tgt, open-iscsi, sshd,
libnfs-utils and libiscsi-bin): one lab (``qrm_core.lab.netlab.Lab``: the real ``qrm
server``, Kea, qrm-tftpd, one QEMU machine under TCG) and a storage server on the lab's
network (``qrm_core.testkit.StorageHost``: ganesha, tgtd, sshd; qrm manages it over SSH).
Three VEs on the same machine, in turn, every round:

* ``ram``: the lab's ``web`` (ramdisk: the root archive fetched into RAM);
* ``nfs``: a root tree exported by ganesha, mounted read-write over NFSv3/TCP;
* ``iscsi``: an ext4 LUN on tgt, CHAP login with iscsistart, mounted read-write.

**VE start -> active**: ``qrm ve start`` until the machine reports ``active`` (placement,
export, reboot through firmware and iPXE, the root mounted, the start script run). Each
network root holds a 32 MB file of random bytes, which the VE reads once it is active
(busybox ``dd``, timed with ``/proc/uptime``): **read inside the guest**. After the
rounds, the host reads the same file (NFS: libnfs ``nfs-cat``) and the same LUN (iSCSI:
libiscsi ``iscsi-perf``, sequential, 5 s) from the lab's network: **read from the host**.

``exports`` (needs nfs-ganesha, tgt, sshd): a storage host of its own; N volumes (NFS:
directories; iSCSI: sparse LUN files whose targets the export makes) exported to N
machines through the drivers over SSH, as the engine does: one ``export_volumes`` batch
(one file check and one reload; one tgt script), then ``unexport_volumes``; beside it,
the reference, ``export_volume`` one at a time for the first ``--single`` volumes (the
per-export time times N is what a pass of one-at-a-time exports costs); then the batch
again (a later pass: iSCSI targets exist by then).

Usage (root; from the repository root, in a virtualenv with qrm-core, qrm-nfs,
qrm-iscsi, qrm-tftpd, qrm-dhcpd and qrm-ramdisk):

    sudo .venv/bin/python bench/netroots/bench_netroots.py boot --rounds 3
    sudo .venv/bin/python bench/netroots/bench_netroots.py exports --count 1000 --single 50

Results: a Markdown table on stdout and JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qrm_core.errors import QrmError
from qrm_core.lab import netlab, rootfs
from qrm_core.lab.netlab import Lab

RESULTS = Path(__file__).resolve().parents[1] / "results"
STORAGE_IP = "10.77.0.35"
BLOB_MB = 32
READ_START = """#!/bin/sh
ve=$(sed -n 's/.*qrm\\.ve=\\([A-Za-z0-9_.-]*\\).*/\\1/p' /proc/cmdline)
(
    sleep 1
    t0=$(cut -d' ' -f1 /proc/uptime)
    dd if=/blob of=/dev/null bs=1M 2>/dev/null
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "qrm-bench-read: ${ve} $t0 $t1" >/dev/console
) &
"""


def utc(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (QrmError, KeyError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def machine() -> str:
    return f"{platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, Python {platform.python_version()}"


def save(kind: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"netroots-{kind}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_tree(target: Path) -> Path:
    rootfs.build_rootfs(target)
    for applet in ("dd", "cut"):
        (target / "bin" / applet).symlink_to("busybox")
    (target / "etc" / "qrm" / "ve-start").write_text(READ_START)
    (target / "blob").write_bytes(os.urandom(BLOB_MB * 1024 * 1024))
    return target


# ---------------------------------------------------------------------------
# boot: VE start -> active, reads
# ---------------------------------------------------------------------------


def bench_boot(args: argparse.Namespace) -> None:
    from qrm_core.testkit import StorageHost

    work = Path(tempfile.mkdtemp(prefix="qrm-bench-netroots-"))
    lab = Lab(work / "lab", progress=lambda line: print("lab:", line, file=sys.stderr))
    host = None
    figures: dict[str, list[float]] = {}
    try:
        state = lab.up(port=0, vms=1, cpus=2, memory_mb=256, dhcp="kea", heartbeat_timeout=15.0)
        host = StorageHost(
            "nrb", work / "storage", STORAGE_IP, bridge_netns=state.netns, bridge=netlab.BRIDGE
        )
        exports, luns = work / "exports", work / "luns"
        exports.mkdir()
        luns.mkdir()
        conf = work / "ganesha" / "qrm-exports.conf"
        conf.parent.mkdir()
        conf.write_text("")
        host.start_ganesha(conf)
        host.start_tgtd()
        key, _ = host.start_sshd()
        env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
        env.update(QRM_SERVER=state.url, QRM_USER=netlab.ADMIN, QRM_PASSWORD=state.password)

        def qrm(*argv: str) -> str:
            done = subprocess.run(
                netlab.qrm_argv(*argv), capture_output=True, text=True, env=env, timeout=300
            )
            if done.returncode != 0:
                raise SystemExit(f"qrm {' '.join(argv)}: {done.stderr.strip()}")
            return done.stdout

        ssh = [
            "--ssh-key",
            str(key),
            "--ssh-user",
            "root",
            "--ssh-host-key",
            str(host.work / "ssh" / "host.pub"),
        ]
        qrm("storage", "add", "-n", "NFS", "-t", "nfs", "-i", STORAGE_IP, *ssh,
            "-s", f"export_root={exports}", "-s", f"ganesha_config={conf}",
            "-s", f"ganesha_pid_file={host.ganesha_pid_file}", "-s", f"ganesha_log_file={host.ganesha_log}")  # fmt: skip
        qrm("storage", "add", "-n", "san", "-t", "iscsi", "-i", STORAGE_IP, *ssh,
            "-s", f"backing_dir={luns}", "-s", f"tgt_control_port={host.tgt_control}",
            "-s", f"state_dir={work / 'iscsi-state'}")  # fmt: skip
        tree = read_tree(exports / "web")
        subprocess.run(["truncate", "-s", "96M", str(luns / "web.img")], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(luns / "web.img")], check=True)
        qrm("filesystem-image", "add", "-n", "web-nfs", "-s", "NFS", "-l", str(tree))
        qrm("filesystem-image", "add", "-n", "web-san", "-s", "san", "-l", "web")
        ves = {"ram": netlab.VE, "nfs": "web-nfs", "iscsi": "web-san"}
        for name in ("web-nfs", "web-san"):
            qrm("ve", "create", "-n", name, "-b", netlab.BOOT_IMAGE, "-f", name)
        ((vm, spec),) = state.vms.items()
        console = lab.console_path(vm)

        def resource() -> Any:
            with lab.client(state) as client:
                return {r.mac: r for r in client.resource_list(None, None, None, 0, None).items}[spec.mac]

        wait("the machine idle", lambda: resource().state == "idle", 180)
        for round_ in range(1, args.rounds + 1):
            for kind, ve in ves.items():
                offset = len(console.read_bytes())
                started = time.time()
                qrm("ve", "start", ve)
                row = wait(
                    f"{ve} active",
                    lambda ve=ve: (r := resource()).state == "active" and r.ve == ve and r,
                    300,
                )
                took = utc(row.state_changed_at) - started
                figures.setdefault(f"{kind}: VE start -> active", []).append(round(took, 2))
                print(f"round {round_} {kind}: VE start -> active {took:.1f} s", file=sys.stderr)
                if kind != "ram":
                    match = wait(
                        "the read",
                        lambda ve=ve, offset=offset: re.search(
                            rf"qrm-bench-read: {ve} ([0-9.]+) ([0-9.]+)",
                            console.read_bytes()[offset:].decode(errors="replace"),
                        ),
                        300,
                    )
                    seconds = float(match.group(2)) - float(match.group(1))
                    figures.setdefault(f"{kind}: read in the guest (MB/s)", []).append(
                        round(BLOB_MB / seconds, 1)
                    )
                qrm("ve", "stop", ve, "--wait", "--timeout", "300")
                wait("the machine idle", lambda: (r := resource()).state == "idle" and r.ve is None, 300)
        figures.update(host_reads(host, state, work, exports / "web", luns))
    finally:
        if host is not None:
            host.stop()
        lab.down()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    data = {"command": " ".join(sys.argv), "machine": machine(), "rounds": args.rounds, "figures": figures}
    print(f"| VE on ... (n={args.rounds}) | median (min-max) |\n|---|---|")
    for key, values in figures.items():
        print(f"| {key} | {summary(values)} |")
    print(f"\nsaved {save('boot', data)}", file=sys.stderr)


def host_reads(host: Any, state: Any, work: Path, tree: Path, luns: Path) -> dict[str, list[float]]:
    """The same file (NFS) and the same LUN (iSCSI) read from the lab's network by libnfs and
    libiscsi, through the drivers' own exports (to the lab server's address and a made-up
    machine), withdrawn afterwards."""
    from qrm_core.config import Settings
    from qrm_core.drivers.base import ExportClient, StorageTarget
    from qrm_core.remote import install_key, pin_host_key
    from qrm_core.services.storage import initiator_name
    from qrm_iscsi.driver import IscsiStorage
    from qrm_iscsi.settings import IscsiSettings
    from qrm_nfs.driver import NfsStorage

    core = Settings(data_dir=work / "bench-qrm")
    known = f"{STORAGE_IP} {' '.join((host.work / 'ssh' / 'host.pub').read_text().split()[:2])}"
    out: dict[str, list[float]] = {}
    me = ExportClient(
        mac="52:54:00:77:ff:01", ip=netlab.SERVER_IP, initiator=initiator_name("52:54:00:77:ff:01")
    )

    nfs = StorageTarget(name="NFSR", type="nfs", address=STORAGE_IP, settings={
        "ssh_user": "root", "export_root": str(tree.parent), "ganesha_config": str(work / "ganesha" / "qrm-exports.conf"),
        "ganesha_pid_file": str(host.ganesha_pid_file), "ganesha_log_file": str(host.ganesha_log)})  # fmt: skip
    install_key(core.data_dir, "NFSR", (host.work / "ssh" / "user").read_text())
    pin_host_key(core.data_dir, "NFSR", STORAGE_IP, 22, known)
    driver = NfsStorage(core)
    host.netns.inside(lambda: driver.export_volume(nfs, str(tree), me))
    try:
        for _ in range(3):
            started = time.monotonic()
            done = subprocess.run(
                ["ip", "netns", "exec", state.netns, "nfs-cat", f"nfs://{STORAGE_IP}{tree}/blob"],
                capture_output=True, timeout=120, check=True,
            )  # fmt: skip
            seconds = time.monotonic() - started
            assert len(done.stdout) == BLOB_MB * 1024 * 1024, done.stderr
            out.setdefault("nfs: read from the host, libnfs nfs-cat (MB/s)", []).append(
                round(BLOB_MB / seconds, 1)
            )
    finally:
        host.netns.inside(lambda: driver.unexport_volume(nfs, str(tree), me))

    san = StorageTarget(name="san", type="iscsi", address=STORAGE_IP, settings={
        "ssh_user": "root", "backing_dir": str(luns), "tgt_control_port": str(host.tgt_control),
        "state_dir": str(work / "iscsi-state")})  # fmt: skip
    # The lab server's CHAP key, so the account tgt has matches.
    lab_key = Path(state_dir_of(work)) / "iscsi" / "chap-san.key"
    (core.state_dir / "iscsi").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lab_key, core.state_dir / "iscsi" / "chap-san.key")
    install_key(core.data_dir, "san", (host.work / "ssh" / "user").read_text())
    pin_host_key(core.data_dir, "san", STORAGE_IP, 22, known)
    iscsi = IscsiStorage(core, IscsiSettings())
    host.netns.inside(lambda: iscsi.export_volume(san, "web", me))
    try:
        target = iscsi.target_name(san, "web")
        env = dict(os.environ, LIBISCSI_CHAP_PASSWORD=iscsi.chap_secret(san, "web"))
        for _ in range(3):
            done = subprocess.run(
                ["ip", "netns", "exec", state.netns, "iscsi-perf", "-i", me.initiator or "", "-t", "5",
                 f"iscsi://{iscsi.account('web')}@{STORAGE_IP}/{target}/1"],
                capture_output=True, text=True, env=env, timeout=60,
            )  # fmt: skip
            rates = re.findall(r"([0-9.]+) MB/s", done.stdout + done.stderr)
            if not rates:
                raise SystemExit(f"iscsi-perf: {(done.stdout + done.stderr).strip()[-500:]}")
            out.setdefault("iscsi: read from the host, libiscsi iscsi-perf (MB/s)", []).append(
                float(rates[-1])
            )
    finally:
        host.netns.inside(lambda: iscsi.unexport_volume(san, "web", me))
    return out


def state_dir_of(work: Path) -> Path:
    """The lab server's state directory (where qrm-iscsi keeps its CHAP keys)."""
    from qrm_core.config import Settings

    return Settings(data_dir=work / "lab" / "data").state_dir


# ---------------------------------------------------------------------------
# exports: one batch beside one at a time
# ---------------------------------------------------------------------------


def bench_exports(args: argparse.Namespace) -> None:
    from qrm_core.config import Settings
    from qrm_core.drivers.base import ExportClient, ExportRequest, StorageTarget
    from qrm_core.remote import install_key, pin_host_key
    from qrm_core.services.storage import initiator_name
    from qrm_core.testkit import StorageHost
    from qrm_iscsi.driver import IscsiStorage
    from qrm_iscsi.settings import IscsiSettings
    from qrm_nfs.driver import NfsStorage

    work = Path(tempfile.mkdtemp(prefix="qrm-bench-exports-"))
    host = StorageHost("nrx", work / "host", STORAGE_IP)
    figures: dict[str, float] = {}
    try:
        exports, luns = work / "exports", work / "luns"
        exports.mkdir()
        luns.mkdir()
        conf = work / "ganesha" / "qrm-exports.conf"
        conf.parent.mkdir()
        conf.write_text("")
        host.start_ganesha(conf)
        host.start_tgtd()
        key, known = host.start_sshd()
        core = Settings(data_dir=work / "qrm")
        for name in ("NFS", "san"):
            install_key(core.data_dir, name, key.read_text())
            pin_host_key(core.data_dir, name, STORAGE_IP, 22, known)
        nfs = StorageTarget(name="NFS", type="nfs", address=STORAGE_IP, settings={
            "ssh_user": "root", "export_root": str(exports), "ganesha_config": str(conf),
            "ganesha_pid_file": str(host.ganesha_pid_file), "ganesha_log_file": str(host.ganesha_log)})  # fmt: skip
        san = StorageTarget(name="san", type="iscsi", address=STORAGE_IP, settings={
            "ssh_user": "root", "backing_dir": str(luns), "tgt_control_port": str(host.tgt_control),
            "state_dir": str(work / "iscsi-state")})  # fmt: skip
        n = args.count
        clients = []
        for i in range(n):
            mac = f"52:54:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
            clients.append(
                ExportClient(mac=mac, ip=f"10.100.{i // 250}.{i % 250 + 1}", initiator=initiator_name(mac))
            )
        for i in range(n):
            (exports / f"v{i:04d}").mkdir()
            (luns / f"v{i:04d}.img").touch()
            os.truncate(luns / f"v{i:04d}.img", 16 * 1024 * 1024)
        drivers = {
            "nfs (ganesha)": (NfsStorage(core), nfs, [str(exports / f"v{i:04d}") for i in range(n)]),
            "iscsi (tgt)": (IscsiStorage(core, IscsiSettings()), san, [f"v{i:04d}" for i in range(n)]),
        }
        for label, (driver, target, locations) in drivers.items():
            requests = [ExportRequest(loc, c) for loc, c in zip(locations, clients, strict=True)]
            figures.update(measure_exports(host, label, driver, target, requests, min(args.single, n)))
    finally:
        host.stop()
        shutil.rmtree(work, ignore_errors=True)
    data = {"command": " ".join(sys.argv), "machine": machine(), "count": args.count, "figures": figures}
    print("| exports over SSH | value |\n|---|---|")
    for key, value in figures.items():
        print(f"| {key} | {value} |")
    print(f"\nsaved {save('exports', data)}", file=sys.stderr)


def measure_exports(
    host: Any, label: str, driver: Any, target: Any, requests: list[Any], single: int
) -> dict[str, float]:
    """Every driver call from the storage host's network, as the engine makes them:

    1. all ``n`` exports in one batch, first time (iSCSI: the batch also makes each
       volume's target, LUN and CHAP account, as for imported volumes), then withdrawn
       in one batch;
    2. the reference: ``single`` of them one at a time (``export_volume``), withdrawn;
    3. all ``n`` again in one batch (what a later pass costs: targets exist), withdrawn.
    """
    n = len(requests)

    def batch(what: str, call: str) -> float:
        started = time.monotonic()
        outcomes = host.netns.inside(lambda: getattr(driver, call)(target, requests))
        took = time.monotonic() - started
        failed = [o for o in outcomes if o.error is not None]
        if failed:
            raise SystemExit(f"{label}: {what}: {len(failed)} failed: {failed[0].error}")
        return took

    first = batch("first batch", "export_volumes")
    first_withdraw = batch("withdrawal", "unexport_volumes")
    started = time.monotonic()
    for request in requests[:single]:
        host.netns.inside(lambda r=request: driver.export_volume(target, r.location, r.client))
    per_export = (time.monotonic() - started) / single
    host.netns.inside(lambda: driver.unexport_volumes(target, requests[:single]))
    again = batch("second batch", "export_volumes")
    withdraw = batch("withdrawal", "unexport_volumes")
    print(
        f"{label}: first batch of {n} {first:.2f} s (withdrawn {first_withdraw:.2f} s), per export "
        f"{per_export:.3f} s, batch again {again:.2f} s, withdrawal {withdraw:.2f} s",
        file=sys.stderr,
    )
    return {
        f"{label}: {n} exports in one batch, first time (s)": round(first, 2),
        f"{label}: {n} exports in one batch, again (s)": round(again, 2),
        f"{label}: {n} withdrawals in one batch (s)": round(withdraw, 2),
        f"{label}: one at a time, per export (s, mean of {single})": round(per_export, 3),
        f"{label}: one at a time, {n} exports (s, = per export x {n})": round(per_export * n, 1),
        f"{label}: ratio one at a time / batch again": round(per_export * n / again, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    boot = sub.add_parser("boot", help="VE start -> active and reads on NFS, iSCSI and RAM roots")
    boot.add_argument("--rounds", type=int, default=3)
    boot.add_argument("--keep", action="store_true", help="keep the work directory (consoles, logs)")
    exports = sub.add_parser("exports", help="exports in one batch beside one at a time")
    exports.add_argument("--count", type=int, default=1000)
    exports.add_argument("--single", type=int, default=50, help="exports made one at a time (the reference)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark makes network namespaces")
    (bench_boot if args.what == "boot" else bench_exports)(args)


if __name__ == "__main__":
    main()
