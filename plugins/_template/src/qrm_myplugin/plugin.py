"""TODO: one line saying what the plugin does (``qrm plugins list`` shows it).

This module is the plugin's ``qrm.plugins`` entry point. Every qrm process
imports it at start-up, so import only cheap things at the top: standard
library, ``qrm_core``, this package's small modules. An SDK (libvirt, pyVmomi,
a DHCP client library) belongs in ``driver.py`` or inside the function that
needs it. The hooks you can implement are in docs/hooks.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qrm_core.plugin_api import hookimpl

if TYPE_CHECKING:
    from qrm_core.plugin_api import HookContext, ResourcePublic


@hookimpl
def qrm_resource_added(resource: ResourcePublic, ctx: HookContext) -> None:
    """React to a new resource (core calls this after the resource is committed).

    An implementation takes any subset of the hook's arguments, by name. If it
    raises, core logs the error and records an error event naming this plugin;
    the other plugins still run and the resource stays added. Raise
    :class:`qrm_core.errors.QrmError` subclasses with a one-line message.
    """
    ctx.log.info("myplugin: resource %s added by %s", resource.mac, ctx.actor)
