"""Core's fixtures (real databases, the real plugin system, ``qrm`` in-process) and
the plugin's: a private Nagios in a network namespace, stopped by its PID."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from nagioslab import Lab, require_nagios

pytest_plugins = ["qrm_core.testing"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A state directory for Nagios: short (its query socket path has a limit) and
    readable by the ``nagios`` user it drops to (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="qrmnag"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_nagios()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.delete()


@pytest.fixture
def nagios_env(qrm_settings, monkeypatch, short_dir, lab) -> dict[str, str]:
    """Settings of a managed Nagios in the lab's ``mon`` namespace. Checks run only
    when a test forces them (long intervals), so soft and hard states are
    deterministic; qrm's own loops run every fraction of a second."""
    values = {
        "QRM_NAGIOS_MANAGE": "true",
        "QRM_NAGIOS_STATE_DIR": str(short_dir),
        "QRM_NAGIOS_NETNS": lab.mon.name,
        "QRM_NAGIOS_CHECK_INTERVAL": "3600",
        "QRM_NAGIOS_RETRY_INTERVAL": "3600",
        "QRM_NAGIOS_MAX_CHECK_ATTEMPTS": "3",
        "QRM_NAGIOS_PING_PACKETS": "1",
        "QRM_NAGIOS_CHECK_TIMEOUT": "3",
        "QRM_NAGIOS_PING_WARNING": "1000.0,50%",
        "QRM_NAGIOS_PING_CRITICAL": "2000.0,100%",
        "QRM_NAGIOS_POLL_INTERVAL": "0.3",
        "QRM_NAGIOS_STATUS_UPDATE_INTERVAL": "1",
        "QRM_NAGIOS_AGENT_REFRESH": "1",
        "QRM_NAGIOS_AGENT_FRESHNESS": "3600",
        "QRM_NAGIOS_RESYNC_INTERVAL": "0",
        "QRM_NAGIOS_TIMEOUT": "30",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture
def nagios_paths(nagios_env) -> dict[str, Path]:
    state = Path(nagios_env["QRM_NAGIOS_STATE_DIR"])
    return {
        "state": state,
        "objects": state / "objects",
        "pipe": state / "rw" / "nagios.cmd",
        "status": state / "var" / "status.dat",
        "cache": state / "var" / "objects.cache",
    }
