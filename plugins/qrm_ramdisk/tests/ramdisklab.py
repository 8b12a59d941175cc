"""A network namespace with a bridge, busybox udhcpd, the real ``qrm server`` (this plugin
installed, found through its entry points) and a QEMU VM: enough to boot a VE from a
ramdisk volume for real.

The namespace, udhcpd and server helpers are core's (:mod:`qrm_core.testkit`,
installed with qrm-core): a plugin's tests run with core and this plugin only.
Every address lives inside the namespace the test creates; processes are
stopped by PID (or by the process group the test created); the namespace is
deleted afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from qrm_core.testing import missing
from qrm_core.testkit import Netns, QrmServerProcess, Udhcpd, stop_process  # noqa: F401


def http_status(netns: Netns, url: str, source: str) -> int:
    """GET ``url`` from inside the namespace, from address ``source``; the HTTP status."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)

    def get() -> int:
        conn = http.client.HTTPConnection(
            parts.hostname or "", parts.port or 80, timeout=10, source_address=(source, 0)
        )
        try:
            conn.request("GET", parts.path)
            return conn.getresponse().status
        finally:
            conn.close()

    return int(netns.inside(get))


def kernel_deb() -> Path:
    """The Debian kernel package ``linux-image-<arch>`` depends on, cached between runs
    in ``${XDG_CACHE_HOME:-~/.cache}/qrm-test/kernel`` (shared with core's boot image tests)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qrm-test" / "kernel"
    cache.mkdir(parents=True, exist_ok=True)
    arch = (
        subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
        or "amd64"
    )
    for attempt in range(2):
        depends = subprocess.run(
            ["apt-cache", "depends", f"linux-image-{arch}"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"Depends: (linux-image-[0-9]\S*)", depends)
        if match:
            break
        if attempt == 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    else:
        missing("a Debian kernel package", "apt-cache cannot resolve linux-image-<arch>; run apt-get update")
    package = match.group(1)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        done = subprocess.run(
            ["apt-get", "download", "-q", package], cwd=cache, capture_output=True, text=True, check=False
        )
        found = sorted(cache.glob(f"{package}_*.deb"))
        if not found:
            missing(
                "a Debian kernel package", f"apt-get download {package} failed: {done.stderr.strip()[-300:]}"
            )
    return found[-1]
