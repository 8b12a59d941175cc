"""Settings of the iSCSI plugin: ``QRM_ISCSI_*`` environment variables or the
``[iscsi]`` table of qrm.toml, for storage servers that say nothing else.

Each storage server can override them with its own settings
(``qrm storage set NAME --setting backing_dir=/srv/iscsi``, strings): a
storage server on another machine is managed over SSH and usually has its
own. Every value ends up inside shell scripts run on the storage server, so
each is held to a safe alphabet here and quoted there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from qrm_core.plugin_api import DriverError, InvalidInput, PluginSettings

ENV_PREFIX = "QRM_ISCSI_"
SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
VOLUME_GROUP = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_+.-]{0,126}$")
IQN_PREFIX = re.compile(
    r"^iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$"
)
#: Per-server settings this driver reads (``qrm storage set NAME --setting KEY=VALUE``).
SERVER_KEYS = ("backing_dir", "volume_group", "tgt_control_port", "portal_port", "iqn_prefix", "state_dir")


def check_path(value: str, what: str) -> str:
    """An absolute, normalised path of safe characters."""
    text = str(value)
    parts = text.rstrip("/").split("/")[1:]
    if not text.startswith("/") or text == "/" or any(not SAFE_COMPONENT.match(p) for p in parts):
        raise ValueError(
            f"{what} {text!r} must be an absolute path of letters, digits, '.', '_', '-' and '/' "
            "(no '.' or '..' parts)"
        )
    return text.rstrip("/")


class IscsiSettings(PluginSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    plugin_table: ClassVar[str] = "iscsi"
    error_label: ClassVar[str] = "iscsi setting"

    backing_dir: str | None = None
    """Directory on the storage server holding file-backed LUNs (``<name>.img``)."""

    volume_group: str | None = None
    """LVM volume group on the storage server: LUNs are its logical volumes
    (instead of files); takes precedence over ``backing_dir``."""

    tgt_control_port: int = Field(default=0, ge=0, le=65535)
    """tgtd's control port (``tgtadm -C N``); 0 is the system's tgtd."""

    portal_port: int = Field(default=3260, ge=1, le=65535)
    """The iSCSI port of the storage server's tgtd, as booting machines reach it."""

    iqn_prefix: str = "iqn.2026-12.org.qrm.storage"
    """Naming authority of the targets qrm creates: ``<prefix>:<storage>.<volume>``."""

    state_dir: str = "/var/lib/qrm-iscsi"
    """Directory on the storage server for qrm's export record and lock."""

    @field_validator("backing_dir", "state_dir")
    @classmethod
    def _path(cls, value: str | None, info: object) -> str | None:
        if value in (None, ""):
            return None
        return check_path(str(value), getattr(info, "field_name", "path"))

    @field_validator("volume_group")
    @classmethod
    def _vg(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not VOLUME_GROUP.match(str(value)):
            raise ValueError(f"volume_group {value!r} is not an LVM volume group name")
        return value

    @field_validator("iqn_prefix")
    @classmethod
    def _iqn(cls, value: str) -> str:
        if not IQN_PREFIX.match(value):
            raise ValueError(f"iqn_prefix {value!r} must look like iqn.YYYY-MM.reversed.domain (lower case)")
        return value


def load() -> IscsiSettings:
    """Read the settings when they are needed, with a one-line error naming the variable."""
    return IscsiSettings.load(error=DriverError)


@dataclass(frozen=True)
class ServerConfig:
    """One storage server as this driver manages it: its settings over the plugin's."""

    backing_dir: str | None
    volume_group: str | None
    tgt_control_port: int
    portal_port: int
    iqn_prefix: str
    state_dir: str


def server_config(defaults: IscsiSettings, settings: Mapping[str, str]) -> ServerConfig:
    """The plugin's settings overridden by a storage server's own (validated the same way)."""
    unknown = sorted(
        k for k in settings if k not in SERVER_KEYS and not k.startswith("ssh_") and not k.startswith("nfs_")
    )
    if unknown:
        raise InvalidInput(
            f"unknown iscsi storage setting(s) {', '.join(unknown)}; known: {', '.join(SERVER_KEYS)}"
        )
    values = {k: v for k, v in settings.items() if k in SERVER_KEYS}
    try:
        merged = IscsiSettings.model_validate({**defaults.model_dump(), **values})
    except ValidationError as exc:
        message = str(exc.errors()[0].get("msg", "invalid value"))
        raise InvalidInput(f"iscsi storage setting: {message.removeprefix('Value error, ')}") from None
    return ServerConfig(
        backing_dir=merged.backing_dir,
        volume_group=merged.volume_group,
        tgt_control_port=merged.tgt_control_port,
        portal_port=merged.portal_port,
        iqn_prefix=merged.iqn_prefix,
        state_dir=merged.state_dir,
    )
