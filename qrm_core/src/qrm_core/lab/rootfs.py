"""The lab's VE root filesystem: a few files around Debian's static busybox.

``qrm lab up`` imports it as the filesystem image ``web-root`` on the lab's
``ramdisk`` storage server (``qrm ramdisk import``), so a VE started in the lab
boots for real: the node agent fetches the archive into RAM, switches into
it, runs ``/etc/qrm/ve-start`` and reports ``active``.

What the VE does, so that a person at ``qrm lab console`` (and a test) can
see it runs the VE's image and kernel: ``ve-start`` prints one line on the
console, ``qrm-lab-ve: <ve> started: kernel <release>, address <ip>, image
<name>, cmdline <qrm.* arguments without the token>``, and serves that same
line with busybox ``httpd`` on port 80. ``ve-stop`` prints ``qrm-lab-ve: <ve>
stopping``.

The tree is deterministic: the same busybox gives the same files, modes and
times, and the ramdisk plugin's import turns that into the same archive bytes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qrm_core.errors import InvalidInput

IMAGE_NAME = "qrm-lab-web"
#: Every file's time (2024-01-01 00:00:00 UTC): the archive does not depend on when it was built.
FIXED_MTIME = 1704067200
APPLETS = (
    "sh",
    "cat",
    "echo",
    "grep",
    "hostname",
    "httpd",
    "ls",
    "mkdir",
    "ps",
    "sed",
    "sleep",
    "tr",
    "uname",
    "wget",
)

VE_START = """#!/bin/sh
# qrm lab VE: run by the qrm node agent once this root is in RAM (see qrm_core/lab/rootfs.py).
ve=$(sed -n 's/.*qrm\\.ve=\\([A-Za-z0-9_.-]*\\).*/\\1/p' /proc/cmdline)
ip=$(cat /run/qrm/ip 2>/dev/null)
args=$(tr ' ' '\\n' </proc/cmdline | grep '^qrm\\.' | grep -v '^qrm\\.enroll=' | tr '\\n' ' ')
line="qrm-lab-ve: ${ve} started: kernel $(uname -r), address ${ip}, image $(cat /etc/qrm-lab-image), cmdline ${args}"
mkdir -p /www
echo "$line" >/www/index.html
httpd -p 80 -h /www
echo "$line" >/dev/console
"""

VE_STOP = """#!/bin/sh
ve=$(sed -n 's/.*qrm\\.ve=\\([A-Za-z0-9_.-]*\\).*/\\1/p' /proc/cmdline)
echo "qrm-lab-ve: ${ve} stopping" >/dev/console
"""


def build_rootfs(target: Path, busybox: Path = Path("/bin/busybox")) -> Path:
    """Write the VE root tree into ``target`` (replaced if it exists) and return it."""
    if not busybox.is_file():
        raise InvalidInput(f"{busybox} is missing: install busybox-static")
    if target.exists():
        shutil.rmtree(target)
    for directory in ("bin", "etc/qrm", "proc", "sys", "dev", "run", "tmp", "www", "var"):
        (target / directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, target / "bin" / "busybox")
    (target / "bin" / "busybox").chmod(0o755)
    for applet in APPLETS:
        (target / "bin" / applet).symlink_to("busybox")
    files = {
        "etc/hostname": ("web\n", 0o644),
        "etc/qrm-lab-image": (IMAGE_NAME + "\n", 0o644),
        "etc/os-release": (f'NAME="qrm lab VE"\nID={IMAGE_NAME}\n', 0o644),
        "etc/qrm/ve-start": (VE_START, 0o755),
        "etc/qrm/ve-stop": (VE_STOP, 0o755),
    }
    for name, (text, mode) in files.items():
        path = target / name
        path.write_text(text)
        path.chmod(mode)
    (target / "tmp").chmod(0o1777)
    for path in sorted(target.rglob("*"), reverse=True):
        os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(target, (FIXED_MTIME, FIXED_MTIME))
    return target
