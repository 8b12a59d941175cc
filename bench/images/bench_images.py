#!/usr/bin/env python3
"""Filesystem images (issue 12): capture speed against plain rsync, and what a revert costs.

1. Capture: a tree of real files (``--size-mb``, default 1024: many small files,
   some medium, a few large, random contents) served by an sshd in a network
   namespace (qrm_core.testkit.CaptureLab). In the same run, alternating:
   ``rsync -aHAX --numeric-ids`` over the same ssh options into an empty directory
   (the reference), and ``qrm``'s capture (the service, SQLite, the fake storage
   whose volume is a plain directory: the copy is what a local NFS volume gets).
   Wall time of each; ratio = reference / qrm (target: >= 0.9).
2. Revert: the same tree as an NFS volume (qrm_nfs's driver, local export root),
   snapshot then revert, on this disk (ext4: full copy) and on a loop-mounted XFS
   with reflink (copy-on-write); and ``reset_ve`` of a stopped-at-once pristine VE on
   it (the service's orchestration plus the revert; booting the machines again is
   the network-boot benchmark's part, not measured here).

Needs root (namespaces, the XFS loop mount), openssh-server, rsync, xfsprogs.
Writes JSON to bench/results/images.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def make_tree(root: Path, size_mb: int) -> tuple[int, int]:
    """~45% of the bytes in 4-64 KB files, ~35% in 256 KB-2 MB files, the rest in 32 MB files."""
    import random

    rng = random.Random(12)
    total = size_mb * 1024 * 1024
    made = files = 0
    budget = [(0.45, 4 << 10, 64 << 10), (0.35, 256 << 10, 2 << 20), (0.20, 32 << 20, 32 << 20)]
    for index, (share, low, high) in enumerate(budget):
        goal = int(total * share)
        done = 0
        directory = root / f"part{index}"
        while done < goal:
            sub = directory / f"d{files // 200:04d}"
            sub.mkdir(parents=True, exist_ok=True)
            size = min(rng.randint(low, high), goal - done)
            (sub / f"f{files:06d}").write_bytes(os.urandom(size))
            done += size
            files += 1
        made += done
    return made, files


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "images.json")
    parser.add_argument(
        "--skip-capture", action="store_true", help="only the snapshot/revert/reset part (no sshd, no rsync)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark uses network namespaces and a loop mount")

    work = Path(tempfile.mkdtemp(prefix="qrm-bench-images-", dir="/var/tmp"))
    os.environ["QRM_DATA_DIR"] = str(work / "data")
    os.environ.pop("QRM_DATABASE_URL", None)
    os.environ.setdefault("QRM_INIT_BOOT_IMAGE", "false")

    from qrm_core import remote
    from qrm_core.config import Settings
    from qrm_core.plugins import STORAGE_GROUP, PluginSystem
    from qrm_core.services import boot_images, images, service_context, setup
    from qrm_core.services import storage as storage_service
    from qrm_core.services import virtual_environments as ves
    from qrm_core.testkit import CaptureLab, reflink_filesystem

    results: dict[str, Any] = {"size_mb": args.size_mb, "repeat": args.repeat}
    source = work / "source"
    took = time.monotonic()
    size, count = make_tree(source, args.size_mb)
    print(f"tree: {size / 1e6:.0f} MB in {count} files (made in {time.monotonic() - took:.0f} s)", flush=True)
    results.update(bytes=size, files=count)

    settings = Settings()
    setup.init(settings, actor="bench", boot_image=False)
    plugins = PluginSystem(settings).load()
    lab = CaptureLab(work / "lab")
    try:
        key = lab.source_key
        runner_for = remote.runner_for

        def runner(s: Any, storage: Any) -> Any:
            return lab.runner(runner_for(s.data_dir, storage.name, storage.address, storage.settings))

        images.storage_runner = runner  # type: ignore[assignment]
        import qrm_core.drivers.fake as fake

        fake.storage_runner = runner  # type: ignore[assignment]
        with service_context(settings, plugins=plugins, actor="bench") as ctx:
            storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
        known = work / "known_hosts"
        known.write_text(lab.source_known + "\n")
        ssh = (
            f"ssh -F none -o BatchMode=yes -o IdentitiesOnly=yes -i {key} -o UserKnownHostsFile={known} "
            "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes"
        )
        plain: list[float] = []
        qrm: list[float] = []
        for round_ in range(0 if args.skip_capture else args.repeat):
            dest = work / f"plain{round_}"
            dest.mkdir()
            drop_caches()
            started = time.monotonic()
            lab.lab.inside(
                lambda dest=dest: subprocess.run(
                    [
                        "rsync",
                        "-aHAX",
                        "--numeric-ids",
                        "-e",
                        ssh,
                        f"root@{lab.source.address}:{source}/",
                        f"{dest}/",
                    ],
                    check=True,
                )
            )
            plain.append(time.monotonic() - started)
            shutil.rmtree(dest)
            drop_caches()
            started = time.monotonic()
            with service_context(settings, plugins=plugins, actor="bench") as ctx:
                image = images.capture_filesystem_image(
                    ctx, name=f"cap{round_}", storage="st", source=f"root@{lab.source.address}:{source}/",
                    identity=key.read_text(),
                )  # fmt: skip
            qrm.append(time.monotonic() - started)
            with service_context(settings, plugins=plugins, actor="bench") as ctx:
                storage_service.remove_filesystem_image(ctx, image.name, purge=True)
            print(f"round {round_ + 1}: rsync {plain[-1]:.1f} s, qrm capture {qrm[-1]:.1f} s", flush=True)
        results["capture"] = (
            None
            if args.skip_capture
            else {
                "rsync_s": plain,
                "qrm_s": qrm,
                "rsync_median_s": statistics.median(plain),
                "qrm_median_s": statistics.median(qrm),
                "ratio": statistics.median(plain) / statistics.median(qrm),
            }
        )
        if results["capture"]:
            print(
                f"capture: qrm/rsync speed ratio {results['capture']['ratio']:.2f} (target >= 0.9)",
                flush=True,
            )
    finally:
        lab.stop()

    # 2. Revert and reset on an NFS volume holding the tree.
    from qrm_nfs.driver import NfsStorage
    from qrm_nfs.settings import NfsSettings

    def revert_on(export_root: Path, tag: str) -> dict[str, Any]:
        export_root.mkdir(parents=True, exist_ok=True)
        driver = NfsStorage(settings, NfsSettings(export_root=export_root))
        plugins.add_driver(STORAGE_GROUP, driver)
        storage = f"nfs-{tag}"
        with service_context(settings, plugins=plugins, actor="bench") as ctx:
            storage_service.add_storage(ctx, name=storage, type="nfs", address="10.0.11.36")
            image = storage_service.add_filesystem_image(
                ctx, name=f"img-{tag}", storage=storage, size_mb=args.size_mb * 2
            )
        subprocess.run(["cp", "-a", f"{source}/.", image.location], check=True)
        drop_caches()
        out: dict[str, Any] = {}
        with service_context(settings, plugins=plugins, actor="bench") as ctx:
            started = time.monotonic()
            snap = images.snapshot_filesystem_image(ctx, image.name, label="base")
            out["snapshot_s"] = time.monotonic() - started
            out["how"] = snap.how
        (Path(image.location) / "part0").rename(Path(image.location) / "moved")
        drop_caches()
        with service_context(settings, plugins=plugins, actor="bench") as ctx:
            started = time.monotonic()
            images.revert_filesystem_image(ctx, image.name, label="base")
            out["revert_s"] = time.monotonic() - started
            ves.create_ve(ctx, name=f"ve-{tag}", boot_image="idle", fs_image=image.name, pristine=True)
            ves.start_ve(ctx, f"ve-{tag}")  # takes the pristine snapshot
        drop_caches()
        with service_context(settings, plugins=plugins, actor="bench") as ctx:
            started = time.monotonic()
            images.reset_ve(ctx, f"ve-{tag}", poll=0.05)
            out["reset_ve_s"] = time.monotonic() - started
        print(f"{tag}: snapshot {out['snapshot_s']:.2f} s, revert {out['revert_s']:.2f} s, "
              f"reset_ve {out['reset_ve_s']:.2f} s ({out['how']})", flush=True)  # fmt: skip
        return out

    with service_context(settings, plugins=plugins, actor="bench") as ctx:
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1.0")
    results["ext4"] = revert_on(work / "exports", "ext4")
    with reflink_filesystem(work / "xfs", size_mb=max(4096, args.size_mb * 4)) as mount:
        results["xfs_reflink"] = revert_on(mount / "exports", "xfs")
    results["load"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in results.items() if k not in ("bytes",)}, indent=1))


if __name__ == "__main__":
    main()
