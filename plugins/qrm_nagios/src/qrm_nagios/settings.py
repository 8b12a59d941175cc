"""Settings of the Nagios plugin (``QRM_NAGIOS_*``, or a ``[nagios]`` table in ``qrm.toml``).

Precedence, highest first: keyword arguments, environment variables, the
``[nagios]`` table of the qrm configuration file, built-in defaults.

The plugin does nothing until it is configured: ``manage = true`` (``qrm
server`` runs a private Nagios 4) or ``main_config`` set (qrm drives the
Nagios that reads that file). Every value that reaches a generated Nagios
object or a command line is checked against a strict alphabet here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from qrm_core.plugin_api import InvalidInput, PluginSettings, Settings

ENV_PREFIX = "QRM_NAGIOS_"

#: Paths go into nagios.cfg (one value per line) and onto command lines (no shell).
_BAD_PATH = re.compile(r"[\x00-\x1f\x7f\"'\\;=]")
#: Network namespace names, Nagios contact names, the host name prefix.
TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{0,16}$")
#: check_ping thresholds: "RTA_MS,LOSS%".
THRESHOLD_RE = re.compile(r"^[0-9]{1,6}(\.[0-9]{1,3})?,[0-9]{1,3}%$")
#: Longest path a unix socket can bind to (sun_path is 108 bytes with the NUL).
UNIX_PATH_MAX = 107


class NagiosSettings(PluginSettings):
    """Everything the Nagios plugin can be configured with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    plugin_table: ClassVar[str] = "nagios"

    manage: bool = False
    """Run a private Nagios 4 from ``qrm server`` (started and stopped with it),
    with its configuration and state under ``state_dir``."""

    main_config: Path | None = None
    """The ``nagios.cfg`` of an existing Nagios that qrm drives (``manage =
    false``). It must contain ``cfg_dir=<object_dir>``; qrm reads its command
    file, status file and interval length from it. Setting it configures the
    plugin."""

    state_dir: Path | None = None
    """Where qrm keeps its Nagios files (default ``<data_dir>/nagios``): the
    objects it writes, and for a managed Nagios its configuration, status,
    command pipe, retention file and log."""

    object_dir: Path | None = None
    """The directory of object files qrm owns, one file per object (default
    ``<state_dir>/objects``). qrm removes ``*.cfg`` files in it that it did
    not render: give it a directory of its own."""

    command_file: Path | None = None
    """Nagios's external command pipe (default: managed ``<state_dir>/rw/nagios.cmd``,
    otherwise the ``command_file`` of ``main_config``)."""

    status_file: Path | None = None
    """Nagios's ``status.dat`` (default: managed ``<state_dir>/var/status.dat``,
    otherwise the ``status_file`` of ``main_config``)."""

    nagios: str = "nagios4"
    """The Nagios program (``nagios4`` on Debian); ``-v`` checks every new configuration."""

    plugin_dir: Path = Path("/usr/lib/nagios/plugins")
    """Where the monitoring plugins (``check_ping``, ``check_tcp``, ...) are."""

    nagios_user: str | None = None
    """User a managed Nagios runs as (default: ``nagios`` when qrm runs as root
    and that user exists, otherwise qrm's own user)."""

    netns: str | None = None
    """Network namespace a managed Nagios runs in (its checks start from there)."""

    host_prefix: str = ""
    """Prefix of every host name qrm gives Nagios (keeps qrm's hosts apart from
    an existing Nagios's own)."""

    contacts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Nagios contacts notified about qrm's hosts and services (names defined
    in the existing Nagios; comma-separated in the environment). Without any,
    qrm's objects notify nobody."""

    check_interval: float = Field(default=60.0, gt=0, le=86400)
    """Seconds between checks of a host and of each active service."""

    retry_interval: float = Field(default=20.0, gt=0, le=86400)
    """Seconds between re-checks while a problem is soft."""

    max_check_attempts: int = Field(default=3, ge=1, le=100)
    """Failed checks in a row before a problem is hard (the only kind that
    can cause failover)."""

    ping_warning: str = "1000.0,20%"
    """check_ping's warning threshold (round trip ms, packet loss)."""

    ping_critical: str = "3000.0,60%"
    """check_ping's critical threshold."""

    ping_packets: int = Field(default=3, ge=1, le=20)
    """ICMP echo requests per ping check."""

    check_timeout: int = Field(default=10, ge=1, le=300)
    """Seconds a check may take before it is critical."""

    agent_refresh: float = Field(default=60.0, gt=0, le=86400)
    """qrm sends each agent's heartbeat state to Nagios at once when it
    changes, and again at least this often."""

    agent_freshness: float = Field(default=300.0, gt=0, le=7 * 86400)
    """Seconds without a result from qrm after which Nagios itself marks the
    agent service UNKNOWN (qrm server is down or cannot reach Nagios). At
    least twice ``agent_refresh``."""

    poll_interval: float = Field(default=5.0, gt=0, le=3600)
    """Seconds between reads of Nagios's status (state changes become events,
    hard DOWN hosts may fail over)."""

    status_update_interval: int = Field(default=5, ge=1, le=3600)
    """A managed Nagios rewrites its status file this often (seconds)."""

    resync_interval: float = Field(default=600.0, ge=0, le=7 * 86400)
    """Seconds between full comparisons of every object with the database
    (0: only at start and on ``qrm nagios sync``)."""

    stale_after: float = Field(default=120.0, gt=0, le=86400)
    """Nagios's status older than this many seconds is reported as stale (is Nagios running?)."""

    host_url: str | None = None
    """Link from a qrm object to its Nagios page, with ``{host}`` for the
    (URL-quoted) host name, e.g.
    ``https://mon.example/cgi-bin/nagios4/extinfo.cgi?type=1&host={host}``."""

    timeout: float = Field(default=60.0, gt=0, le=600)
    """Seconds to wait for ``nagios4 -v`` and for a managed Nagios to start or stop."""

    # -- validation ------------------------------------------------------

    @field_validator("netns", "nagios_user")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not TOKEN_RE.match(value):
            raise ValueError(f"{value!r} is not allowed: use letters, digits, '.', '_' and '-'")
        return value

    @field_validator("host_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not PREFIX_RE.match(value):
            raise ValueError(f"{value!r} is not allowed: at most 16 letters, digits, '.', '_' and '-'")
        return value

    @field_validator("contacts", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("contacts")
    @classmethod
    def _contacts(cls, value: list[str]) -> list[str]:
        for name in value:
            if not TOKEN_RE.match(name):
                raise ValueError(f"contact {name!r} is not allowed: use letters, digits, '.', '_' and '-'")
        return value

    @field_validator("ping_warning", "ping_critical")
    @classmethod
    def _threshold(cls, value: str) -> str:
        if not THRESHOLD_RE.match(value):
            raise ValueError(f"{value!r} is not a check_ping threshold such as 1000.0,20%")
        return value

    @field_validator("main_config", "state_dir", "object_dir", "command_file", "status_file", "plugin_dir")
    @classmethod
    def _path(cls, value: Path | None) -> Path | None:
        if value is None or str(value) == "":
            return None
        if _BAD_PATH.search(str(value)):
            raise ValueError(f"{str(value)!r} contains quotes, backslashes, ';', '=' or control characters")
        return value

    @field_validator("nagios")
    @classmethod
    def _program(cls, value: str) -> str:
        if not value or _BAD_PATH.search(value) or " " in value:
            raise ValueError(f"{value!r} is not a program name or path")
        return value

    @field_validator("host_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not re.match(r"^https?://[^\s\"'<>\\]+$", value) or "{host}" not in value:
            raise ValueError("must be an http(s) URL containing {host}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> NagiosSettings:
        if self.manage and self.main_config is not None:
            raise ValueError(
                "set either manage (qrm runs its own Nagios) or main_config (an existing Nagios), not both"
            )
        if self.agent_freshness < 2 * self.agent_refresh:
            raise ValueError(
                f"QRM_NAGIOS_AGENT_FRESHNESS ({self.agent_freshness:g} s) must be at least twice "
                f"QRM_NAGIOS_AGENT_REFRESH ({self.agent_refresh:g} s)"
            )
        if self.retry_interval > self.check_interval:
            raise ValueError("QRM_NAGIOS_RETRY_INTERVAL must not exceed QRM_NAGIOS_CHECK_INTERVAL")
        return self

    # -- derived values --------------------------------------------------

    @property
    def configured(self) -> bool:
        """Whether there is a Nagios to keep in step (managed, or an existing one)."""
        return self.manage or self.main_config is not None

    @property
    def mode(self) -> str:
        return "managed" if self.manage else "existing" if self.main_config is not None else "off"

    def paths(self, core: Settings) -> NagiosPaths:
        state = self.state_dir if self.state_dir is not None else core.data_dir / "nagios"
        managed = self.manage
        paths = NagiosPaths(
            state_dir=state,
            object_dir=self.object_dir or state / "objects",
            main_config=(state / "nagios.cfg") if managed else self.main_config,
            command_file=self.command_file or (state / "rw" / "nagios.cmd" if managed else None),
            status_file=self.status_file or (state / "var" / "status.dat" if managed else None),
            query_socket=state / "rw" / "nagios.qh",
            lock=state / "qrm-nagios.lock",
            log=state / "var" / "nagios.log",
            stdout=state / "var" / "nagios.out",
            check_dir=state / "check",
            watch_state=state / "watch.json",
        )
        for path in (paths.state_dir, paths.object_dir):
            if _BAD_PATH.search(str(path)):
                raise InvalidInput(
                    f"path {str(path)!r} contains quotes, backslashes, ';', '=' or control characters"
                )
        if managed and len(os.fsencode(paths.query_socket)) > UNIX_PATH_MAX:
            raise InvalidInput(
                f"Nagios's query socket {paths.query_socket} would be longer than {UNIX_PATH_MAX} bytes; "
                "set QRM_NAGIOS_STATE_DIR to a shorter path"
            )
        return paths


class NagiosPaths:
    """Every file the plugin uses (a plain value object)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        object_dir: Path,
        main_config: Path | None,
        command_file: Path | None,
        status_file: Path | None,
        query_socket: Path,
        lock: Path,
        log: Path,
        stdout: Path,
        check_dir: Path,
        watch_state: Path,
    ) -> None:
        self.state_dir = state_dir
        self.object_dir = object_dir
        self.main_config = main_config
        self.command_file = command_file
        self.status_file = status_file
        self.query_socket = query_socket
        self.lock = lock
        self.log = log
        self.stdout = stdout
        self.check_dir = check_dir
        self.watch_state = watch_state


def load_settings(**overrides: Any) -> NagiosSettings:
    """The plugin's settings; a bad value gives one line naming the variable.

    Every hook asks for them (a registration calls two hooks), and building
    them costs about a millisecond, so they are kept until the environment or
    the configuration file changes (core's ``PluginSettings.cached``)."""
    if overrides:
        return NagiosSettings.load(**overrides)
    return NagiosSettings.cached()


def require_configured(settings: NagiosSettings) -> NagiosSettings:
    """Commands that need a Nagios raise a one-line hint when there is none."""
    if not settings.configured:
        raise InvalidInput(
            "the Nagios plugin is not configured: set QRM_NAGIOS_MANAGE=true (qrm runs its own Nagios) "
            "or QRM_NAGIOS_MAIN_CONFIG=/etc/nagios4/nagios.cfg (an existing one); see the qrm-nagios README"
        )
    return settings
