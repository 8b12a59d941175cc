"""Core's fixtures, and what the Xen driver's tests need.

Xen cannot run on the machines qrm is developed and tested on (no Xen
hypervisor to boot into): the driver runs against libvirt's **test driver**
with domain type ``xen`` (every domain defined with
``VIR_DOMAIN_DEFINE_VALIDATE``, so libvirt's RelaxNG schema checks each
generated XML), and its xl config files are read by **Xen's own parser**
(libxlutil from Debian's libxenmisc4.17, the library ``xl`` parses with). The
test driver cannot migrate: the tests that migrate use the
``DefinitionMover`` seam (qrm_libvirt.testing) and say so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
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
def xl_parser():
    """Xen's config parser (libxlutil), or skip (fail under CI=true) naming the package."""
    from qrm_core.testing import missing
    from qrm_xen import xlparse

    found = xlparse.parser()
    if found is None:
        missing("Xen's config parser libxlutil", f"apt-get install {xlparse.PACKAGE}")
    return found


@pytest.fixture
def xen_dir(tmp_path: Path) -> Path:
    """Stands for /etc/xen on the test hosts (their URIs are local: files are written here)."""
    path = tmp_path / "etc-xen"
    path.mkdir()
    return path


@pytest.fixture
def settings(tmp_path: Path, xen_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from qrm_core.plugin_api import Settings

    for key in list(__import__("os").environ):
        if key.startswith("QRM_") and not key.startswith("QRM_TEST_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("QRM_XEN_CONFIG_DIR", str(xen_dir))
    monkeypatch.setenv("QRM_XEN_CHECK_CONFIG", "always")
    monkeypatch.setenv("QRM_XEN_SHUTDOWN_TIMEOUT", "0")
    yield Settings(data_dir=tmp_path / "data")
