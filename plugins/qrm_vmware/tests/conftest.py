"""Fixtures of qrm-vmware's tests: core's (real databases, ``qrm`` in-process) and a real vCenter simulator.

vcsim is built from Debian's govmomi sources (tests/vcsim/vcsimbuild.py) once per
checkout and cache key, started on a free loopback port per module, and
stopped by its PID. Without the Go packages the tests skip, saying what to
install (under CI=true they fail).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrm_core.testing import missing

sys.path.insert(0, str(Path(__file__).resolve().parent / "vcsim"))
import vcsimbuild as build
import vcsimkit as kit

pytest_plugins = ["qrm_core.testing"]

#: The inventory most modules share: a cluster of two hosts, a standalone host, a VM in each pool.
INVENTORY = ("-dc", "1", "-cluster", "1", "-host", "2", "-standalone-host", "1", "-vm", "1")


@pytest.fixture(scope="session")
def vcsim_binary(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    gone = build.missing_packages()
    if gone and not __import__("os").environ.get("QRM_TEST_VCSIM"):
        missing("vcsim (built from Debian's govmomi sources)", kit.MISSING_HINT)
    cache = getattr(request.config, "cache", None)
    default = cache.mkdir("qrm-vmware-vcsim") if cache is not None else tmp_path_factory.mktemp("vcsim")
    try:
        return kit.binary(Path(default))
    except build.BuildError as exc:
        pytest.fail(f"cannot build vcsim: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def vcsim(vcsim_binary: Path) -> Iterator[kit.Vcsim]:
    """One simulated vCenter for the module (its tests must not depend on each other's changes)."""
    sim = kit.start(vcsim_binary, *INVENTORY)
    try:
        yield sim
    finally:
        sim.stop()
