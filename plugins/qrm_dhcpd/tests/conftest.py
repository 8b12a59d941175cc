"""Fixtures of the DHCP tests (helpers live in dhcpdlab.py); core's fixtures come from qrm_core.testing."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dhcpdlab import Wire, need, need_root_netns, running

from qrm_core.config import Settings
from qrm_dhcpd.service import ManagedDhcpServer

pytest_plugins = ["qrm_core.testing"]


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[Wire]:
    need_root_netns()
    w = Wire(tmp_path)
    try:
        w.up()
        yield w
    finally:
        w.down()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qd"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kea_bin() -> str:
    return need("kea-dhcp4", "kea-dhcp4-server")


@pytest.fixture
def dhcpd_bin() -> str:
    return need("dhcpd", "isc-dhcp-server")


@pytest.fixture
def kea_server(
    wire: Wire, short_dir: Path, monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings, kea_bin: str
) -> Iterator[ManagedDhcpServer]:
    with running("kea", wire, short_dir, monkeypatch, qrm_settings) as managed:
        yield managed
