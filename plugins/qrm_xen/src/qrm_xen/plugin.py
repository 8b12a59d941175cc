"""qrm-xen's hook module: Xen hosts reached through libvirt (libxl).

Every qrm process imports this module, so it imports nothing heavy: the driver
(``qrm_xen.driver``, entry point ``xen`` in ``qrm.hypervisors``) and with it
libvirt-python are loaded only when a xen host or partition is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qrm_core.plugin_api import hookimpl

if TYPE_CHECKING:
    from qrm_core.plugin_api import HookContext


@hookimpl
def qrm_collect_services(ctx: HookContext) -> list[Any]:
    """Inside ``qrm server``: follow the lifecycle events of every xen host
    (qrm_libvirt.service; libvirt-python is imported only now)."""
    from qrm_libvirt.service import lifecycle_services
    from qrm_xen.driver import XenHypervisor

    return lifecycle_services(XenHypervisor, ctx)
