"""Core's fixtures, and what the qemu driver's tests need: libvirt-python, and for the
real-QEMU tests two private libvirt daemons (qrm_core.lab.libvirtd) in a network
namespace with a bridge, shared by a test module (each starts in well under a second;
their guests are QEMU under TCG)."""

from __future__ import annotations

import os
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


@pytest.fixture(autouse=True)
def fresh_connections() -> Iterator[None]:
    """Each test opens its own connections (and the pool forgets them afterwards)."""
    yield
    from qrm_libvirt.connections import pool

    pool().close_all()


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    from qrm_core.plugin_api import Settings

    for key in list(os.environ):
        if key.startswith("QRM_") and not key.startswith("QRM_TEST_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("QRM_QEMU_SHUTDOWN_TIMEOUT", "2")
    return Settings(data_dir=tmp_path / "data")


class Hosts:
    """Two libvirt daemons (hosts hv1, hv2) in one namespace whose bridge br0 has 10.88.0.1."""

    ADDRESS = "10.88.0.1"

    def __init__(self, directory: Path) -> None:
        from qrm_core.lab.libvirtd import LibvirtDaemon
        from qrm_core.testkit import Netns

        self.netns = Netns("lvq")
        self.daemons = []
        try:
            self.netns.ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
            self.netns.ip("addr", "add", f"{self.ADDRESS}/24", "dev", "br0")
            self.netns.ip("link", "set", "br0", "up")
            for name in ("hv1", "hv2"):
                daemon = LibvirtDaemon(directory / name, netns=self.netns.name)
                self.daemons.append(daemon)
                daemon.start()
        except BaseException:
            self.close()
            raise

    def target(self, index: int, **settings: str):
        from qrm_core.plugin_api import HostTarget

        daemon = self.daemons[index]
        return HostTarget(
            resource_id=index + 1,
            mac=f"52:54:00:fe:01:{index + 1:02x}",
            address=self.ADDRESS,
            hostname=f"hv{index + 1}",
            cpus=os.cpu_count() or 2,
            memory_mb=4096,
            uri=daemon.uri,
            network="br0",
            settings={"domain_type": "qemu", **settings},
        )

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        self.netns.delete()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, libvirt: ModuleType) -> Iterator[Hosts]:
    """Two real libvirt hosts for a test module (needs root for namespaces and libvirtd)."""
    from qrm_core.lab import libvirtd
    from qrm_core.testing import missing

    problem = libvirtd.missing()
    if problem:
        missing(problem, f"apt-get install {libvirtd.PACKAGE}")
    if os.geteuid() != 0:
        missing("root", "run the real-QEMU tests as root (network namespaces, a root libvirtd)")
    made = Hosts(tmp_path_factory.mktemp("libvirtd"))
    try:
        yield made
    finally:
        made.close()
