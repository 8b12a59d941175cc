"""PluginSettings.cached(): settings a hook asks for on every registration are
built once, and built again when the environment or qrm.toml changes."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic_settings import SettingsConfigDict

from qrm_core.config import reset_settings_cache
from qrm_core.errors import InvalidInput
from qrm_core.plugin_api import PluginSettings


class CountedSettings(PluginSettings):
    model_config = SettingsConfigDict(env_prefix="QRM_COUNTED_", extra="ignore")
    plugin_table: ClassVar[str] = "counted"
    builds: ClassVar[int] = 0
    port: int = 69

    def model_post_init(self, context: object) -> None:
        type(self).builds += 1


@pytest.fixture
def counted(tmp_path, monkeypatch):
    monkeypatch.setenv("QRM_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("QRM_CONFIG", raising=False)
    monkeypatch.delenv("QRM_COUNTED_PORT", raising=False)
    reset_settings_cache()
    CountedSettings.builds = 0
    yield CountedSettings
    reset_settings_cache()


def test_kept_while_nothing_changes(counted) -> None:
    first = counted.cached()
    assert all(counted.cached() is first for _ in range(100))
    assert counted.builds == 1 and first.port == 69


def test_built_again_when_the_environment_changes(counted, monkeypatch) -> None:
    assert counted.cached().port == 69
    monkeypatch.setenv("QRM_COUNTED_PORT", "6969")
    assert counted.cached().port == 6969
    monkeypatch.setenv("QRM_UNRELATED", "x")  # any change of the environment: built again, still right
    assert counted.cached().port == 6969
    assert counted.builds == 3


def test_built_again_when_the_configuration_file_changes(counted, tmp_path) -> None:
    assert counted.cached().port == 69
    (tmp_path / "qrm.toml").write_text("[counted]\nport = 1069\n")
    assert counted.cached().port == 1069
    (tmp_path / "qrm.toml").write_text("[counted]\nport = 10690\n")  # a different size
    assert counted.cached().port == 10690


def test_a_bad_value_fails_every_time_and_is_not_kept(counted, monkeypatch) -> None:
    monkeypatch.setenv("QRM_COUNTED_PORT", "many")
    for _ in range(2):
        with pytest.raises(InvalidInput, match="QRM_COUNTED_PORT"):
            counted.cached()
    monkeypatch.setenv("QRM_COUNTED_PORT", "70")
    assert counted.cached().port == 70


def test_reset_settings_cache_forgets_them(counted) -> None:
    first = counted.cached()
    reset_settings_cache()
    assert counted.cached() is not first
