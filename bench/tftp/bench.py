#!/usr/bin/env python3
"""TFTP throughput and concurrency: ``qrm tftpd`` beside tftpd-hpa (and stock tftpy) on loopback.

Usage (as root or any user; from the repository, with qrm-core and qrm-tftpd installed)::

    python bench/tftp/bench.py                      # 32 MiB, blksize 512/1468/8192, 7 runs, 200 clients
    python bench/tftp/bench.py --size-mib 64 --runs 9 --no-tftpy --json bench/results/tftp.json

Every server serves the same file from the same directory on 127.0.0.1; the
client is curl (``--tftp-blksize``). Runs are interleaved (server order
shuffled per round) so that load from elsewhere on the machine hits all
servers alike; the figure is the median. Then 200 curl processes start at
once and fetch the iPXE bootstrap (``undionly.kpxe``) from each server:
failures and wall time are counted.

Servers are started by PID and stopped by PID; nothing is left behind.
See bench/tftp/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BOOTSTRAP = Path("/usr/lib/ipxe/undionly.kpxe")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(port: int, timeout: float = 15.0) -> None:
    """A TFTP server answers a request for a missing file with an ERROR packet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            try:
                sock.sendto(b"\0\1no-such-file\0octet\0", ("127.0.0.1", port))
                sock.recvfrom(1024)
                return
            except OSError:
                time.sleep(0.1)
    raise SystemExit(f"no TFTP server answered on port {port}")


def start_servers(root: Path, work: Path, with_tftpy: bool) -> dict[str, tuple[subprocess.Popen, int]]:
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    in_tftpd = shutil.which("in.tftpd")
    if in_tftpd is None:
        raise SystemExit("in.tftpd not found: apt-get install tftpd-hpa")
    port = free_port()
    # -L: foreground; it drops to user tftp, so the files are world-readable
    servers["tftpd-hpa"] = (
        subprocess.Popen([in_tftpd, "-L", "-s", str(root), "-a", f"127.0.0.1:{port}"]),
        port,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
    env["QRM_DATA_DIR"] = str(work / "qrm")
    qrm = [sys.executable, "-c", "from qrm_core.cli.main import run; run()"]
    subprocess.run([*qrm, "init"], env=env, check=True, capture_output=True)
    port = free_port()
    servers["qrm tftpd"] = (
        subprocess.Popen(
            [*qrm, "tftpd", "--listen", "127.0.0.1", "--port", str(port), "--root", str(root)],
            env=env,
            stdout=subprocess.DEVNULL,
        ),
        port,
    )
    if with_tftpy:
        port = free_port()
        code = (
            "import logging, sys, tftpy; logging.getLogger('tftpy').setLevel(logging.WARNING); "
            "tftpy.TftpServer(sys.argv[1]).listen('127.0.0.1', int(sys.argv[2]))"
        )
        servers["tftpy 0.8.7 (stock)"] = (
            subprocess.Popen([sys.executable, "-c", code, str(root), str(port)], stderr=subprocess.DEVNULL),
            port,
        )
    for _, port in servers.values():
        wait_ready(port)
    return servers


def curl(port: int, name: str, blksize: int | None, timeout: float = 300) -> tuple[bool, int, float, str]:
    cmd = [
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        str(timeout),
        "-w",
        "%{size_download} %{time_total}",
    ]
    if blksize:
        cmd += ["--tftp-blksize", str(blksize)]
    result = subprocess.run([*cmd, f"tftp://127.0.0.1:{port}/{name}"], capture_output=True, text=True)
    size, seconds = [*result.stdout.split(), "0", "0"][:2]
    return result.returncode == 0, int(size), float(seconds), result.stderr.strip()


def throughput(
    servers, name: str, size: int, blksizes: list[int], runs: int
) -> dict[str, dict[int, list[float]]]:
    speeds: dict[str, dict[int, list[float]]] = {s: {b: [] for b in blksizes} for s in servers}
    for blksize in blksizes:
        for run in range(runs):
            order = list(servers)
            random.shuffle(order)
            for server in order:
                ok, got, seconds, err = curl(servers[server][1], name, blksize)
                if not ok or got != size:
                    print(f"  {server} blksize {blksize}: FAILED ({got} bytes) {err}", flush=True)
                    continue
                speeds[server][blksize].append(size / seconds / 1e6)
            print(
                f"  blksize {blksize} run {run + 1}/{runs}: "
                + ", ".join(f"{s} {speeds[s][blksize][-1]:.1f}" for s in servers if speeds[s][blksize]),
                flush=True,
            )
    return speeds


def concurrent(port: int, name: str, clients: int, blksize: int | None) -> tuple[int, float]:
    cmd = ["curl", "-sS", "-o", "/dev/null", "--max-time", "60", "-w", "%{size_download}"]
    if blksize:
        cmd += ["--tftp-blksize", str(blksize)]
    expected = BOOTSTRAP.stat().st_size
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*cmd, f"tftp://127.0.0.1:{port}/{name}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(clients)
    ]
    failures = 0
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0 or out.strip() != str(expected).encode():
            failures += 1
    return failures, time.perf_counter() - started


def machine() -> dict[str, str]:
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    curl_version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "cpu": f"{os.cpu_count()} x {model}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "curl": " ".join(curl_version.split()[:2]),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--blksizes", default="512,1468,8192")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--no-tftpy", action="store_true", help="leave out stock tftpy")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl not found: apt-get install curl")
    if not BOOTSTRAP.is_file():
        raise SystemExit(f"{BOOTSTRAP} not found: apt-get install ipxe")
    blksizes = [int(b) for b in args.blksizes.split(",")]
    size = args.size_mib << 20
    info = machine()
    print("machine:", json.dumps(info), flush=True)
    work = Path(tempfile.mkdtemp(prefix="qrm-tftp-bench-"))
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        root = work / "root"
        root.mkdir()
        os.chmod(work, 0o755)
        os.chmod(root, 0o755)
        with (root / "big.bin").open("wb") as handle:
            for _ in range(args.size_mib):
                handle.write(os.urandom(1 << 20))
        shutil.copy(BOOTSTRAP, root / BOOTSTRAP.name)
        for path in root.iterdir():
            path.chmod(0o644)
        servers = start_servers(root, work, not args.no_tftpy)
        print(f"throughput, {args.size_mib} MiB, median of {args.runs} (MB/s):", flush=True)
        speeds = throughput(servers, "big.bin", size, blksizes, args.runs)
        medians = {
            s: {b: statistics.median(v) if v else float("nan") for b, v in per.items()}
            for s, per in speeds.items()
        }
        print(f"{args.clients} clients at once fetching {BOOTSTRAP.name}:", flush=True)
        crowd = {}
        for server, (_, port) in servers.items():
            for blksize in (None, 1432):
                failures, seconds = concurrent(port, BOOTSTRAP.name, args.clients, blksize)
                crowd[f"{server} blksize {blksize or 512}"] = {
                    "failures": failures,
                    "seconds": round(seconds, 2),
                }
                print(
                    f"  {server} blksize {blksize or 512}: {failures} failures, {seconds:.2f} s", flush=True
                )
    finally:
        for process, _ in servers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        shutil.rmtree(work, ignore_errors=True)

    info["load after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    hpa = medians["tftpd-hpa"]
    print()
    print("| server | " + " | ".join(f"blksize {b}" for b in blksizes) + " |")
    print("|---|" + "---|" * len(blksizes))
    for server, per in medians.items():
        cells = []
        for b in blksizes:
            ratio = f" ({per[b] / hpa[b]:.2f}×)" if server != "tftpd-hpa" else ""
            cells.append(f"{per[b]:.1f}{ratio}")
        print(f"| {server} | " + " | ".join(cells) + " |")
    print()
    for what, result in crowd.items():
        print(f"- {args.clients} clients, {what}: {result['failures']} failures, {result['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "size_mib": args.size_mib,
                    "runs": args.runs,
                    "speeds_mb_s": speeds,
                    "medians_mb_s": medians,
                    "concurrent": crowd,
                },
                indent=2,
            )
        )
    qrm_ratio = medians["qrm tftpd"].get(1468, float("nan")) / hpa.get(1468, float("nan"))
    crowd_failures = sum(r["failures"] for k, r in crowd.items() if k.startswith("qrm tftpd"))
    print(
        f"\nqrm tftpd / tftpd-hpa at blksize 1468: {qrm_ratio:.2f} (target >= 0.6); "
        f"qrm tftpd failures with {args.clients} clients: {crowd_failures}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
