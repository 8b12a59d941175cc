"""The plugin's settings: ``QRM_XEN_*`` environment variables or the ``[xen]`` table of qrm.toml.

Per-host values (``qrm resource set HOST --host-setting KEY=VALUE``) override
them for one host: see :data:`qrm_xen.driver.XenHypervisor.flavour_host_settings`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from qrm_libvirt.settings import HypervisorSettings

ENV_PREFIX = "QRM_XEN_"


class XenSettings(HypervisorSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    plugin_table: ClassVar[str] = "xen"

    mode: str = Field("hvm", pattern="^(hvm|pv)$")
    """``hvm``: a fully virtualised PC that PXE-boots from its emulated NIC; ``pv``: a
    paravirtualised guest started from a kernel and initrd on the host (``pv_kernel``...)."""

    config_dir: str = Field("/etc/xen", pattern=r"^/[A-Za-z0-9_./+-]{0,255}$")
    """Where the xl config file of each partition is written on its host (``<dir>/<name>``)."""

    write_config: bool = True
    """Write an xl config file per partition beside defining it through libvirt."""

    autostart: bool = False
    """Start partitions with their host: libvirt's autostart and a link in ``<config_dir>/auto/``
    (xendomains)."""

    check_config: str = Field("auto", pattern="^(auto|always|never)$")
    """Check each xl config with Xen's own parser (libxlutil) before writing it: ``auto`` where
    the library is installed, ``always`` (fail where it is not), ``never``."""

    nic_model: str = Field("e1000", pattern="^(e1000|rtl8139|virtio-net)$")
    """The emulated NIC of HVM guests (it network-boots with its option ROM)."""

    pv_kernel: str | None = None
    """PV guests: the kernel on the host (qrm's idle boot image kernel, copied there)."""

    pv_ramdisk: str | None = None
    """PV guests: the initrd on the host (qrm's idle boot image initrd)."""

    pv_cmdline: str | None = None
    """PV guests: the kernel command line (what qrm's iPXE script would give, qrm.server=...)."""


def load() -> XenSettings:
    """Read the settings when they are needed, with a one-line error naming the variable."""
    return XenSettings.load()
