"""Settings: one validated object, read from the environment (``QRM_*``) and an
optional TOML file.

Precedence, highest first: explicit keyword arguments, environment variables,
the TOML file named by ``QRM_CONFIG`` (default ``<data_dir>/qrm.toml``),
built-in defaults.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Self

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

if TYPE_CHECKING:
    from qrm_core.errors import QrmError


def default_data_dir() -> Path:
    """The user's data directory for qrm (``~/.local/share/qrm`` on Linux)."""
    return Path(platformdirs.user_data_dir("qrm", appauthor=False))


def config_file() -> Path:
    """The TOML file settings are read from (plugins read their own tables from it)."""
    return _config_file()


def _config_file() -> Path:
    explicit = os.environ.get("QRM_CONFIG")
    if explicit:
        return Path(explicit)
    data_dir = os.environ.get("QRM_DATA_DIR")
    return (Path(data_dir) if data_dir else default_data_dir()) / "qrm.toml"


class Settings(BaseSettings):
    """Everything qrm can be configured with."""

    model_config = SettingsConfigDict(env_prefix="QRM_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    """Where the embedded database, boot files and driver state live."""

    database_url: str | None = None
    """SQLAlchemy URL; default is SQLite (WAL) at ``<data_dir>/qrm.db``.
    PostgreSQL: ``postgresql+psycopg://user@host/db``; MariaDB/MySQL:
    ``mysql+pymysql://user@host/db``."""

    log_dir: Path | None = None
    """Log directory; default ``<data_dir>/logs``."""

    log_level: str = "INFO"

    disable_plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Plugins never loaded, whatever their persisted state (``QRM_DISABLE_PLUGINS=a,b``)."""

    enabled_storage: Annotated[list[str] | None, NoDecode] = None
    """Storage driver names that may be used; None means every installed one."""

    enabled_hypervisors: Annotated[list[str] | None, NoDecode] = None
    """Hypervisor driver names that may be used; None means every installed one."""

    actor: str | None = None
    """Who the local CLI acts as in the audit log (default: the OS user)."""

    server: str | None = None
    """Run CLI commands through this qrm server's API (``QRM_SERVER``, ``--server``)."""

    user: str | None = None
    """User for ``--server`` (``QRM_USER``, ``-u``)."""

    password: str | None = None
    """Password for ``--server`` (``QRM_PASSWORD``, ``-p``)."""

    token: str | None = None
    """API token for ``--server`` instead of user and password (``QRM_TOKEN``)."""

    init_boot_image: bool = True
    """``qrm init`` builds the default boot image when there is none and a
    kernel is available (a cached Debian kernel package or /boot)."""

    server_url: str | None = None
    """How booting machines reach ``qrm server`` (``http://10.0.0.1:8080``);
    default: built from the address and port the server listens on."""

    heartbeat_interval: float = 10.0
    """Seconds between node-agent heartbeats (told to agents at registration)."""

    heartbeat_timeout: float = 35.0
    """A resource whose heartbeats stop for this long goes to ``error``."""

    boot_timeout: float = 300.0
    """A resource qrm told to reboot has this long (counted from its last
    heartbeat) to register again before it goes to ``error``: firmware, PXE
    and the kernel take longer than a heartbeat interval, much longer on real
    servers."""

    @field_validator("disable_plugins", "enabled_storage", "enabled_hypervisors", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file()
        if config_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    # -- derived values -------------------------------------------------

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'qrm.db'}"

    @property
    def effective_log_dir(self) -> Path:
        return self.log_dir if self.log_dir is not None else self.data_dir / "logs"

    @property
    def boot_dir(self) -> Path:
        """Kernels and initrds of boot images."""
        return self.data_dir / "boot"

    @property
    def state_dir(self) -> Path:
        """Per-driver state (the fake drivers keep theirs here)."""
        return self.data_dir / "state"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def reset_settings_cache() -> None:
    """Forget the cached settings (tests change the environment between runs)."""
    get_settings.cache_clear()


# ---------------------------------------------------------------------------
# Plugins' own settings
# ---------------------------------------------------------------------------


def read_config_table(name: str) -> dict[str, Any]:
    """The ``[name]`` table of the qrm configuration file (empty if there is none)."""
    path = config_file()
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle).get(name, {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        from qrm_core.errors import InvalidInput

        raise InvalidInput(f"cannot read {path}: {exc}") from None
    return table if isinstance(table, dict) else {}


class PluginSettings(BaseSettings):
    """Base class of a plugin's settings.

    Values come from the keyword arguments, then the environment
    (``QRM_<NAME>_*``, set ``model_config = SettingsConfigDict(env_prefix=...)``),
    then the ``[<plugin_table>]`` table of ``qrm.toml``. :meth:`load` turns a bad
    value into one line naming the variable::

        class TftpSettings(PluginSettings):
            model_config = SettingsConfigDict(env_prefix="QRM_TFTPD_", extra="ignore")
            plugin_table: ClassVar[str] = "tftpd"
            port: int = 69

        settings = TftpSettings.load()
    """

    plugin_table: ClassVar[str] = ""
    #: How errors name a setting ("invalid <label> QRM_X_Y: ...").
    error_label: ClassVar[str] = "setting"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        table = read_config_table(cls.plugin_table) if cls.plugin_table else {}
        if table:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=table))
        return (init_settings, env_settings)

    @classmethod
    def load(cls, *, error: type[QrmError] | None = None, **overrides: Any) -> Self:
        """The settings, with overrides (None values ignored); a bad value is one
        line (:class:`~qrm_core.errors.InvalidInput`, or ``error``)."""
        from pydantic import ValidationError

        from qrm_core.errors import InvalidInput

        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            prefix = str(cls.model_config.get("env_prefix", ""))
            text = (
                f"invalid {cls.error_label} {prefix}{where.upper()}: {message}"
                if where
                else (f"invalid {cls.error_label}: {message}")
            )
            raise (error or InvalidInput)(text) from None
