"""The plugin's settings: ``QRM_QEMU_*`` environment variables or the ``[qemu]`` table of qrm.toml.

Per-host values (``qrm resource set HOST --host-setting KEY=VALUE``) override
them for one host: see :data:`qrm_qemu.driver.QemuHypervisor.flavour_host_settings`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from qrm_libvirt.settings import HypervisorSettings

ENV_PREFIX = "QRM_QEMU_"


class QemuSettings(HypervisorSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    plugin_table: ClassVar[str] = "qemu"

    domain_type: str = Field("auto", pattern="^(auto|kvm|qemu)$")
    """``kvm``, ``qemu`` (TCG: emulation) or ``auto``: kvm where the host offers it and its CPU has
    VT-x/AMD-V, else qemu (decided per host)."""

    nic_model: str = Field("virtio", pattern="^(virtio|e1000|e1000e|rtl8139)$")
    """The NIC QEMU emulates; it network-boots with its iPXE ROM."""

    migration_max_downtime: int = Field(0, ge=0, le=10_000)
    """Milliseconds a live migration may pause the partition for its last pages
    (``migrateSetMaxDowntime``); 0: QEMU's own limit (300 ms). A larger value lets
    a busy guest's move end sooner at the price of a longer pause."""

    migration_auto_converge: bool = False
    """``VIR_MIGRATE_AUTO_CONVERGE``: QEMU throttles the guest's vCPUs while it
    dirties memory faster than the move sends it (the move ends; the guest runs slower meanwhile)."""

    migration_parallel: int = Field(0, ge=0, le=32)
    """Connections of a multifd live migration (``VIR_MIGRATE_PARALLEL``); 0: one stream."""


def load() -> QemuSettings:
    """Read the settings when they are needed, with a one-line error naming the variable."""
    return QemuSettings.load()
