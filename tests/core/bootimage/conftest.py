"""Fixtures for the boot image tests: a real Debian kernel package, unpacked once, and
one boot image built from it that several tests boot.

The kernel package is the one Debian's ``linux-image-<arch>`` depends on,
fetched with ``apt-get download`` once into ``${XDG_CACHE_HOME:-~/.cache}/qrm-test/kernel``
and reused by later runs. Under CI=true a failed download fails the run.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrm_core.bootimage import builder
from qrm_core.bootimage import kernel as kernels
from qrm_core.testing import missing


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qrm-test" / "kernel"


def _apt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=600, check=False)


def _kernel_package() -> str | None:
    arch = _apt("dpkg", "--print-architecture").stdout.strip() or "amd64"
    for attempt in range(2):
        done = _apt("apt-cache", "depends", f"linux-image-{arch}")
        match = re.search(r"Depends: (linux-image-[0-9][^\s]*)", done.stdout)
        if match:
            return match.group(1)
        if attempt == 0 and os.geteuid() == 0:
            _apt("apt-get", "update", "-qq")
    return None


@pytest.fixture(scope="session")
def kernel_deb() -> Path:
    """A real Debian kernel package file (downloaded once, cached between runs)."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    package = _kernel_package()
    if package is not None:
        found = sorted(directory.glob(f"{package}_*.deb"))
        if found:
            return found[-1]
        done = _apt("apt-get", "download", "-q", package, cwd=directory)
        found = sorted(directory.glob(f"{package}_*.deb"))
        if found:
            return found[-1]
        missing("a Debian kernel package", f"apt-get download {package} failed: {done.stderr.strip()[-300:]}")
    cached = kernels.cached_debs(directory)
    if cached and not os.environ.get("CI"):
        return cached[-1][1]
    missing("a Debian kernel package", "apt-cache cannot resolve linux-image-<arch>; run apt-get update")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def kernel_version(kernel_deb: Path) -> str:
    match = kernels._DEB_NAME.match(kernel_deb.name)
    assert match, kernel_deb
    return match.group("kver")


@pytest.fixture(scope="session")
def kernel_tree(
    kernel_deb: Path, kernel_version: str, tmp_path_factory: pytest.TempPathFactory
) -> kernels.KernelTree:
    """The package unpacked (dpkg-deb) with modules.dep computed (depmod -b), once per run."""
    work = tmp_path_factory.mktemp("kernel")
    tree = kernels.from_deb(kernel_deb, kernel_version, work)
    kernels.ensure_modules_dep(tree, work)
    return tree


@pytest.fixture(scope="session")
def boot_image(
    kernel_tree: kernels.KernelTree, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[builder.BuildResult]:
    """The boot image every boot test uses, built once."""
    work = tmp_path_factory.mktemp("bootimage")
    yield builder.build_initrd(kernel_tree, work / "out", work_dir=work)


@pytest.fixture(scope="session")
def root_and_netns() -> None:
    if os.geteuid() != 0:
        missing("root", "network namespaces and QEMU taps need root")
    if not Path("/bin/busybox").is_file():
        missing("busybox-static", "apt-get install busybox-static")
    if subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode != 0:
        missing("ip netns", "apt-get install iproute2")
