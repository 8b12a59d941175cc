"""qrm-qemu's hook module: QEMU/KVM hosts reached through libvirt.

Every qrm process imports this module, so it imports nothing heavy: the driver
(``qrm_qemu.driver``, entry point ``qemu`` in ``qrm.hypervisors``) and with it
libvirt-python are loaded only when a qemu host or partition is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qrm_core.plugin_api import hookimpl

if TYPE_CHECKING:
    from qrm_core.plugin_api import HookContext


@hookimpl
def qrm_collect_services(ctx: HookContext) -> list[Any]:
    """Inside ``qrm server``: follow the lifecycle events of every qemu host
    (qrm_libvirt.service; libvirt-python is imported only now)."""
    from qrm_libvirt.service import lifecycle_services
    from qrm_qemu.driver import QemuHypervisor

    return lifecycle_services(QemuHypervisor, ctx)
