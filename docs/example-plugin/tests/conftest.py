"""The example plugin's tests use core's fixtures: real databases, real plugin system."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qrm_core.config import Settings

pytest_plugins = ["qrm_core.testing"]


@pytest.fixture
def plain_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings for tests that touch no database (driver and file tests run once, not per backend)."""
    for key in [
        k for k in __import__("os").environ if k.startswith("QRM_") and not k.startswith("QRM_TEST_")
    ]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("QRM_DATA_DIR", str(tmp_path / "data"))
    yield Settings()
