"""The reaper the lab's libvirt daemons run under (qrm_core.lab.libvirtd.REAPER).

libvirt waits for a stopped QEMU until its zombie is reaped; where PID 1 reaps late
(1.3-1.8 s in this project's sandboxes) that delayed every destroy and live
migration. The reaper adopts the orphans of what it runs and reaps them at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qrm_core.lab.libvirtd import REAPER

#: Forks a grandchild (an orphan once its parent exits) that lives 0.3 s; prints its PID; then waits.
DAEMONIZES = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(0.3)
        os._exit(0)
    os.write(w, b"x")
    os._exit(0)
os.read(r, 1)
print(open("/proc/self/stat").read().split()[0], flush=True)
time.sleep(30)
"""


def gone_or_zombie(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return "zombie" if stat[stat.rfind(")") + 2] == "Z" else "running"


def test_orphans_are_reaped_at_once_and_sigterm_is_passed_on() -> None:
    reaper = subprocess.Popen(
        [sys.executable, "-I", "-c", REAPER, sys.executable, "-c", DAEMONIZES],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reaper.stdout is not None
        parent = int(reaper.stdout.readline())
        grandchild = None
        for child in Path(f"/proc/{reaper.pid}/task/{reaper.pid}/children").read_text().split():
            if int(child) != parent:
                grandchild = int(child)
        assert grandchild is not None, "the orphan was not adopted by the reaper"
        # It exits 0.3 s after its birth; its zombie must not outlive that by more than a moment.
        deadline = time.monotonic() + 5
        while gone_or_zombie(grandchild) == "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        exited = time.monotonic()
        while gone_or_zombie(grandchild) != "gone" and time.monotonic() - exited < 5:
            time.sleep(0.01)
        assert time.monotonic() - exited < 0.5, "the orphan's zombie lingered"
        os.kill(reaper.pid, signal.SIGTERM)
        assert reaper.wait(timeout=10) == 256 - signal.SIGTERM  # the child's status, passed on
    finally:
        if reaper.poll() is None:
            reaper.kill()
            reaper.wait()
