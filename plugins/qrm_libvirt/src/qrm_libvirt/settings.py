"""Settings of the shared libvirt layer (``QRM_LIBVIRT_*``, ``[libvirt]`` in qrm.toml),
and the base of each hypervisor plugin's own settings.

Per-host values (``qrm resource set HOST --host-setting KEY=VALUE``) override
the plugin's for that host; :data:`HOST_SETTINGS` lists the keys every
libvirt driver understands.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from qrm_core.plugin_api import PluginSettings


class LibvirtSettings(PluginSettings):
    """How qrm talks to libvirt daemons (one pool of connections per process)."""

    model_config = SettingsConfigDict(env_prefix="QRM_LIBVIRT_", extra="ignore")
    plugin_table: ClassVar[str] = "libvirt"

    connect_timeout: float = Field(15.0, gt=0, le=600)
    """Seconds to wait for a host's libvirtd to answer when connecting."""

    keepalive_interval: int = Field(5, ge=0, le=600)
    """Seconds between keepalive messages on a remote connection (0: none)."""

    keepalive_count: int = Field(3, ge=1, le=100)
    """Unanswered keepalives after which a host is taken for unreachable."""

    watch: bool = True
    """``qrm server`` follows every libvirt host's lifecycle events (each plugin its own hosts)."""

    watch_refresh: float = Field(10.0, gt=0, le=3600)
    """Seconds between two reads of the host list by the watcher (a database read, not a libvirt poll)."""


class HypervisorSettings(PluginSettings):
    """What the qemu and xen plugins both have; each adds its own and its prefix."""

    shutdown_timeout: float = Field(30.0, ge=0, le=3600)
    """Seconds a partition gets to power off after the ACPI request before it is pulled."""

    migration: str = Field("managed", pattern="^(managed|p2p)$")
    """``managed``: qrm connects to both hosts and libvirt migrates between them;
    ``p2p``: the source host's libvirtd connects to the destination itself."""

    migration_bandwidth: int = Field(0, ge=0)
    """MiB/s a live migration may use (0: no limit)."""


#: Per-host settings every libvirt driver reads (``HostTarget.settings``).
HOST_SETTINGS = {
    "shutdown_timeout": "seconds between the ACPI request and pulling the plug",
    "migration": "managed or p2p",
    "migration_address": "the address the migration stream goes to (default: the host's address)",
    "console_log_dir": "a directory on the host where each partition's console is logged",
}
