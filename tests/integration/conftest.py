"""Integration tests: core, every plugin under plugins/, the example plugin and
the deliberately broken plugin, all installed (``nox -s integration``).

The tests discover plugins through their entry points instead of naming them:
plugins are added by several people, and each one must pass these checks.
``qrm_core.testing`` (loaded by tests/conftest.py) provides ``qrm_cli`` and
``qrm_settings``, which run every test that touches the database on SQLite,
PostgreSQL and MariaDB.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_support import BROKEN_DISTRIBUTION, EXAMPLE_DISTRIBUTION, installed

from qrm_core.config import Settings, reset_settings_cache
from qrm_core.plugins import set_plugin_system
from qrm_core.testing import missing


@pytest.fixture(autouse=True)
def _integration_environment() -> None:
    """These tests only mean something with everything installed; say so instead of failing obscurely."""
    for distribution, path in (
        (EXAMPLE_DISTRIBUTION, "docs/example-plugin"),
        (BROKEN_DISTRIBUTION, "tests/integration/broken-plugin"),
    ):
        if not installed(distribution):
            missing(distribution, f"run 'nox -s integration', or pip install -e ./{path}")


@pytest.fixture
def plain_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings with a private data directory, for tests that do not touch the database."""
    for key in [k for k in os.environ if k.startswith("QRM_") and not k.startswith("QRM_TEST_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("QRM_DATA_DIR", str(tmp_path / "data"))
    reset_settings_cache()
    set_plugin_system(None)
    yield Settings()
    set_plugin_system(None)
    reset_settings_cache()
