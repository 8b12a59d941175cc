"""Settings: one validated object, read from the environment (``QRM_*``) and an
optional TOML file.

Precedence, highest first: explicit keyword arguments, environment variables,
the TOML file named by ``QRM_CONFIG`` (default ``<data_dir>/qrm.toml``),
built-in defaults.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Self, cast

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


#: _config_file_text(): (QRM_CONFIG, QRM_DATA_DIR) -> the file's path as text.
_CONFIG_TEXT: dict[tuple[str | None, str | None], str] = {}


def _config_file_text() -> str:
    """:func:`_config_file` as text, without building paths each time when either
    variable names it (the server's case: :func:`settings_source_key` runs several
    times per registration). Without them the path depends on the user's home and
    XDG variables, and is worked out each time."""
    key = (os.environ.get("QRM_CONFIG") or None, os.environ.get("QRM_DATA_DIR") or None)
    if key == (None, None):
        return str(_config_file())
    text = _CONFIG_TEXT.get(key)
    if text is None:
        if len(_CONFIG_TEXT) > 64:
            _CONFIG_TEXT.clear()
        text = _CONFIG_TEXT[key] = str(_config_file())
    return text


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

    enabled_power: Annotated[list[str] | None, NoDecode] = None
    """Power driver names that may be used; None means every installed one."""

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

    provisioning_address: str | None = None
    """This host's address on the provisioning network (``QRM_PROVISIONING_ADDRESS``):
    where the boot services (TFTP, plugins' listeners) listen unless their own
    setting names another. Unset, they serve 127.0.0.1 only, and nothing
    listens beyond loopback while the admin user has the default password
    (``qrm_core.services.listening``)."""

    max_upload_mb: int = Field(default=4096, ge=1, le=1024 * 1024)
    """Largest upload the API and the console take (``QRM_MAX_UPLOAD_MB``): a
    boot image's kernel and initrd together. Every other request body is
    limited to 1 MB, the node agent's to 64 KB (``qrm_core.api.limits``)."""

    heartbeat_interval: float = 10.0
    """Seconds between node-agent heartbeats (told to agents at registration)."""

    heartbeat_timeout: float = 35.0
    """A resource whose heartbeats stop for this long goes to ``error``."""

    boot_timeout: float = 300.0
    """A resource qrm told to reboot has this long (counted from its last
    heartbeat) to register again before it goes to ``error``: firmware, PXE
    and the kernel take longer than a heartbeat interval, much longer on real
    servers."""

    cpu_overcommit: float = Field(default=4.0, gt=0, le=100)
    """Virtual CPUs a hypervisor host may give its partitions per CPU it has
    (``QRM_CPU_OVERCOMMIT``): partitions mostly wait, so 4 by default."""

    partition_sync_interval: float = Field(default=60.0, ge=0, le=86400)
    """Seconds between the engine's reconciliations of each hypervisor host's
    partitions with what its hypervisor lists (``QRM_PARTITION_SYNC_INTERVAL``;
    0 turns them off). Drivers that follow their hypervisor's events report
    changes at once; this catches what no event reported."""

    memory_overcommit: float = Field(default=1.0, gt=0, le=100)
    """Partition memory a host may give per MB it has (``QRM_MEMORY_OVERCOMMIT``):
    1 by default, as memory given twice is memory a partition can lose."""

    login_user_failures: int = Field(default=10, ge=1, le=100000)
    """Failed password logins a user name may have within ``login_window``
    before its logins are refused (HTTP 429) for the rest of the window
    (``QRM_LOGIN_USER_FAILURES``)."""

    login_address_failures: int = Field(default=50, ge=1, le=100000)
    """Failed password logins one client address may have within
    ``login_window`` (``QRM_LOGIN_ADDRESS_FAILURES``); higher than the user
    limit, as several people may share an address."""

    login_window: float = Field(default=300.0, gt=0, le=86400)
    """Seconds, from a first failed login, over which failures are counted
    (``QRM_LOGIN_WINDOW``)."""

    @field_validator(
        "disable_plugins", "enabled_storage", "enabled_hypervisors", "enabled_power", mode="before"
    )
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("provisioning_address", mode="before")
    @classmethod
    def _address(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        try:
            return str(ipaddress.ip_address(str(value).strip()))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None

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
    _PLUGIN_SETTINGS.clear()


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


def settings_source_key() -> tuple[Any, ...]:
    """What settings are read from, as a value (compare with ``==``) that
    changes when they may have: the environment and the configuration file's
    identity (path, inode, size, modification time). Cheap (microseconds), so a hook
    called on every registration can keep its settings until this changes
    (:meth:`PluginSettings.cached`)."""
    path = _config_file_text()
    try:
        st = os.stat(path)
        identity: tuple[Any, ...] = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        identity = (path,)
    # The environment as the process holds it (bytes), copied in C: decoding
    # each variable through os.environ was most of the cost.
    raw = getattr(os.environ, "_data", None)
    environment: Any = (
        dict(raw)
        if isinstance(raw, dict)
        else tuple(item for item in os.environ.items() if item[0].startswith("QRM_"))
    )
    return (environment, identity)


#: PluginSettings.cached(): per class, (settings_source_key(), settings).
_PLUGIN_SETTINGS: dict[type[Any], tuple[tuple[Any, ...], Any]] = {}


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
    def cached(cls) -> Self:
        """:meth:`load` without overrides, kept until the environment or the
        configuration file changes (:func:`settings_source_key`).

        Building settings costs about a millisecond (pydantic-settings inspects
        every field's type on each build); a hook that runs on every
        registration asks for them each time. A bad value raises as
        :meth:`load` does, every time, and is not kept."""
        key = settings_source_key()
        kept = _PLUGIN_SETTINGS.get(cls)
        if kept is not None and kept[0] == key:
            return cast("Self", kept[1])
        settings = cls.load()
        _PLUGIN_SETTINGS[cls] = (key, settings)
        return settings

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
