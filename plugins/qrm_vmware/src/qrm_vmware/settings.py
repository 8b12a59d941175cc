"""Settings of qrm-vmware (``QRM_VMWARE_*``, or a ``[vmware]`` table in ``qrm.toml``).

Never core's Settings: paths derive from core's ``data_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from qrm_core.plugin_api import PluginSettings, Settings

ENV_PREFIX = "QRM_VMWARE_"


class VmwareSettings(PluginSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    plugin_table: ClassVar[str] = "vmware"

    key_file: Path | None = None
    """The site key that encrypts stored vCenter passwords (default
    ``<data_dir>/vmware-site.key``, created with mode 0600 by the first
    ``qrm vmware connect``). Every qrm server of a site that syncs or drives
    vCenter needs a copy of the same file."""

    run_sync: bool = True
    """Run the periodic sync and the watchers in ``qrm server`` (with at least one connection)."""

    sync_interval: float = Field(default=300.0, ge=5.0, le=86400.0)
    """Seconds between two full syncs of every connection by ``qrm server``
    (hosts, clusters, capacity). State changes of partitions arrive sooner,
    through vCenter's own updates (WaitForUpdatesEx)."""

    watch: bool = True
    """Follow power-state changes of qrm's VMs with WaitForUpdatesEx in ``qrm server``."""

    task_timeout: float = Field(default=600.0, gt=0, le=86400.0)
    """Seconds to wait for a vCenter task (power, reconfigure, vMotion, create) before giving up."""

    shutdown_timeout: float = Field(default=60.0, ge=0, le=3600.0)
    """Seconds a stop (not forced) waits for the guest to shut down (VMware Tools
    in the guest) before it powers the VM off; qrm's boot images have no Tools,
    so their VMs are powered off at once."""

    connect_timeout: float = Field(default=30.0, gt=0, le=600.0)
    """Seconds to wait for vCenter to answer one request."""

    page_size: int = Field(default=1000, ge=1, le=100000)
    """Objects per page of a PropertyCollector retrieval (RetrievePropertiesEx maxObjects)."""

    network: str = "VM Network"
    """Port group that partitions' network card joins when the host sets none
    (``qrm resource set HOST --network PORTGROUP``): the provisioning network,
    where qrm's DHCP and TFTP answer."""

    guest_id: str = "otherGuest64"
    """The guest OS type of the VMs qrm creates."""

    def effective_key_file(self, core: Settings) -> Path:
        return self.key_file if self.key_file is not None else core.data_dir / "vmware-site.key"


def load() -> VmwareSettings:
    """Read the settings when they are needed, with a one-line error naming the variable."""
    return VmwareSettings.load()
