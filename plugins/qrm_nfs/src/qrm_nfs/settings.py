"""Settings of the NFS plugin: environment ``QRM_NFS_*`` or the ``[nfs]`` table of qrm.toml.

Precedence, highest first: keyword arguments, environment variables, the
``[nfs]`` table of the qrm configuration file (``QRM_CONFIG``, default
``<data_dir>/qrm.toml``), built-in defaults.

Every path here may end up inside the generated nfs-ganesha configuration,
so each one is held to the same safe alphabet as volume locations: absolute,
normalised, made of letters, digits, ``.``, ``_``, ``-`` and ``/``. That keeps
quoting trivial and makes injection through a setting impossible.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from qrm_core.plugin_api import DriverError, PluginSettings, Settings

SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_safe_path(value: str | Path, what: str) -> Path:
    """An absolute, normalised path of safe characters; ValueError otherwise."""
    text = str(value)
    if not text.startswith("/") or text == "/":
        raise ValueError(f"{what} must be an absolute path below '/' (got {text!r})")
    parts = text.rstrip("/").split("/")[1:]
    if any(not SAFE_COMPONENT.match(part) for part in parts):
        raise ValueError(
            f"{what} {text!r} may only hold letters, digits, '.', '_', '-' and '/', "
            "with no empty, '.' or '..' parts and no part starting with '.' or '-'"
        )
    return Path(text.rstrip("/"))


class NfsSettings(PluginSettings):
    """How the ``nfs`` storage driver finds (or runs) its nfs-ganesha."""

    model_config = SettingsConfigDict(env_prefix="QRM_NFS_", extra="ignore")
    plugin_table: ClassVar[str] = "nfs"
    error_label: ClassVar[str] = "nfs setting"

    export_root: Path | None = None
    """Directory holding the volumes, one subdirectory per volume. Required to
    create, list, remove or export volumes."""

    ganesha_config: Path | None = None
    """The EXPORT file this driver owns and regenerates (include it from
    ganesha.conf with ``%include``). Required to export volumes."""

    ganesha_pid_file: Path | None = None
    """PID file of the running ganesha.nfsd; the driver sends it SIGHUP to
    reload exports. Default with ``run_ganesha``: ``<state_dir>/ganesha.pid``."""

    ganesha_log_file: Path | None = None
    """ganesha's log file. When known, every reload is confirmed from the log
    (the call returns once ganesha has applied the exports, and fails if it
    refused them). Default with ``run_ganesha``: ``<state_dir>/ganesha.log``."""

    check_config: bool = True
    """Before a new EXPORT file replaces the old one, load it in a throwaway
    ganesha.nfsd (private network and mount namespaces) and read its verdict."""

    first_export_id: int = Field(default=1000, ge=1, le=60000)
    """Export_Id of the first volume; later volumes take the next free id.
    Keeps clear of hand-written exports, which usually start at 1."""

    reload_timeout: float = Field(default=15.0, gt=0)
    """Seconds to wait for ganesha to confirm a reload (or to start)."""

    run_ganesha: bool = False
    """Let ``qrm server`` run ganesha.nfsd itself (a background service) with
    a main configuration generated under ``state_dir``."""

    run_rpcbind: bool = False
    """With ``run_ganesha``: also run an rpcbind of its own (NFSv3 clients
    need one). Leave off when the host already runs rpcbind."""

    netns: str | None = None
    """With ``run_ganesha``: run ganesha (and rpcbind) inside this existing
    network namespace, e.g. a provisioning network kept apart from the host."""

    nfs_port: int = Field(default=2049, ge=1, le=65535)
    """With ``run_ganesha``: the NFS port."""

    mnt_port: int = Field(default=20048, ge=1, le=65535)
    """With ``run_ganesha``: the MOUNT protocol port (fixed, so firewalls can allow it)."""

    state_dir: Path | None = None
    """With ``run_ganesha``: where the main configuration, PID file, log and
    NFSv4 recovery data live. Default ``<qrm data_dir>/state/nfs``."""

    @field_validator("export_root", "ganesha_config", "ganesha_pid_file", "ganesha_log_file", "state_dir")
    @classmethod
    def _safe_path(cls, value: Path | None, info: Any) -> Path | None:
        if value is None or str(value) == "":
            return None
        return check_safe_path(value, info.field_name)

    @field_validator("netns")
    @classmethod
    def _netns(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if not NETNS_RE.match(value):
            raise ValueError(f"netns {value!r} is not a network namespace name")
        return value

    # -- derived values --------------------------------------------------

    def effective_state_dir(self, core: Settings) -> Path:
        return self.state_dir if self.state_dir is not None else core.state_dir / "nfs"

    def effective_pid_file(self, core: Settings) -> Path | None:
        if self.ganesha_pid_file is not None:
            return self.ganesha_pid_file
        return self.effective_state_dir(core) / "ganesha.pid" if self.run_ganesha else None

    def effective_log_file(self, core: Settings) -> Path | None:
        if self.ganesha_log_file is not None:
            return self.ganesha_log_file
        return self.effective_state_dir(core) / "ganesha.log" if self.run_ganesha else None


def load_settings(**overrides: Any) -> NfsSettings:
    """Read the plugin's settings; an invalid one is a one-line :class:`DriverError`."""
    return NfsSettings.load(error=DriverError, **overrides)
