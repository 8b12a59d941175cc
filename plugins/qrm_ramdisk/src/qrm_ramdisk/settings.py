"""Settings of the ramdisk plugin: environment variables ``QRM_RAMDISK_*``.

Precedence, highest first: keyword arguments, environment variables, defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import field_validator
from pydantic_settings import SettingsConfigDict

from qrm_core.plugin_api import DriverError, PluginSettings, Settings


class RamdiskSettings(PluginSettings):
    """Where archives live and how booting machines reach them."""

    model_config = SettingsConfigDict(env_prefix="QRM_RAMDISK_", extra="ignore")
    plugin_table: ClassVar[str] = "ramdisk"
    error_label: ClassVar[str] = "ramdisk setting"

    root: Path | None = None
    """Directory holding one subdirectory per ramdisk storage server.
    Default ``<qrm data_dir>/ramdisk``."""

    base_url: str | None = None
    """How booting machines reach the server that serves the archives, e.g.
    ``http://10.0.0.1:8080``. Default: qrm's ``QRM_SERVER_URL``."""

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if not value.startswith(("http://", "https://")) or any(ch.isspace() for ch in value):
            raise ValueError(f"{value!r} is not an http:// URL")
        return value.rstrip("/")

    @field_validator("root")
    @classmethod
    def _root(cls, value: Path | None) -> Path | None:
        if value is None or str(value) == "":
            return None
        if not value.is_absolute():
            raise ValueError(f"{value} is not an absolute path")
        return value

    def effective_root(self, core: Settings) -> Path:
        return self.root if self.root is not None else core.data_dir / "ramdisk"

    def effective_base_url(self, core: Settings) -> str | None:
        if self.base_url:
            return self.base_url
        return core.server_url.rstrip("/") if core.server_url else None


def load_settings(**overrides: Any) -> RamdiskSettings:
    """Read the plugin's settings; an invalid one is a one-line :class:`DriverError`."""
    return RamdiskSettings.load(error=DriverError, **overrides)
