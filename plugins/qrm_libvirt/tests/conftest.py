"""Core's fixtures (databases, settings) and what the libvirt tests need: libvirt-python,
lxml for RelaxNG, a libvirtd for the real-daemon tests (each skips on a laptop without it
and fails under CI=true, saying what to install)."""

from __future__ import annotations

from types import ModuleType

import pytest

pytest_plugins = ["qrm_core.testing"]


@pytest.fixture(scope="session")
def libvirt() -> ModuleType:
    from qrm_core.testing import missing

    try:
        import libvirt
    except ImportError:
        missing(
            "libvirt-python",
            "apt-get install libvirt-dev pkg-config gcc python3-dev; pip install libvirt-python",
        )
        raise
    return libvirt


@pytest.fixture(scope="session")
def schema() -> None:
    from qrm_core.testing import missing
    from qrm_libvirt.testing import SCHEMA

    try:
        import lxml  # noqa: F401
    except ImportError:
        missing("lxml", "pip install lxml")
    if not SCHEMA.exists():
        missing(f"libvirt's RelaxNG schemas ({SCHEMA})", "apt-get install libvirt0")


@pytest.fixture(scope="session")
def daemon_tools(libvirt: ModuleType) -> None:
    from qrm_core.lab import libvirtd
    from qrm_core.testing import missing

    problem = libvirtd.missing()
    if problem:
        missing(problem, f"apt-get install {libvirtd.PACKAGE}")
