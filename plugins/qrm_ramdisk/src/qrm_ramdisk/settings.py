"""Settings of the ramdisk plugin: environment variables ``QRM_RAMDISK_*``.

Precedence, highest first: keyword arguments, environment variables, defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from qrm_core.config import Settings
from qrm_core.errors import DriverError


class RamdiskSettings(BaseSettings):
    """Where archives live and how booting machines reach them."""

    model_config = SettingsConfigDict(env_prefix="QRM_RAMDISK_", extra="ignore")

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
    try:
        return RamdiskSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise DriverError(f"invalid ramdisk setting QRM_RAMDISK_{where.upper()}: {message}") from None
