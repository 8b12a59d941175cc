"""The lifecycle watcher as ``qrm server`` runs it: one per libvirt plugin.

Each plugin's ``qrm_collect_services`` hook returns :func:`lifecycle_services`:
a :class:`~qrm_libvirt.watcher.LifecycleWatcher` over every host resource
that runs the plugin's hypervisor (``hypervisor_hosts``, read again every
``QRM_LIBVIRT_WATCH_REFRESH`` seconds), whose observations become qrm's
records through core's services:

* a partition running, paused or stopped behind qrm's back:
  ``observe_partition_state`` (its resource follows; an event names it);
* a domain undefined behind qrm's back: ``sync_host`` for its host (the
  partition goes to ``error``, "it is gone from HOST");
* a host that cannot be reached, and again when it is back: one event on the
  host resource (not on the plugin: its health is libvirt-python);
* a domain qrm does not know on that host (the destination's "started" of a
  live migration that core records a moment later, or one qrm did not make):
  left to the partition sync, which warns about domains qrm did not make.
"""

from __future__ import annotations

import logging
from typing import Any

from qrm_core.plugin_api import HookContext, QrmError
from qrm_libvirt import binding
from qrm_libvirt.driver import LibvirtHypervisor
from qrm_libvirt.settings import LibvirtSettings

log = logging.getLogger("qrm.libvirt")


class Recorder:
    """Turns the watcher's observations into qrm's records (the watcher's worker thread)."""

    def __init__(self, driver: LibvirtHypervisor, settings: Any) -> None:
        self.driver = driver
        self.settings = settings
        self.actor = f"plugin:{driver.name}"

    def hosts(self) -> list[Any]:
        from qrm_core.plugin_api import hypervisor_hosts, read_context

        with read_context(self.settings) as ctx:
            return hypervisor_hosts(ctx, self.driver.name)

    def __call__(self, observation: Any) -> None:
        from qrm_core.plugin_api import (
            EventLevel,
            list_partitions,
            observe_partition_state,
            service_context,
            sync_host,
        )

        host = observation.host
        with service_context(self.settings, actor=self.actor) as ctx:
            if observation.name is None:
                if observation.state == "unreachable":
                    message = f"{self.driver.name} host {host.label} cannot be reached: {observation.reason}"
                    level = EventLevel.WARNING
                else:
                    message = f"{self.driver.name} host {host.label} can be reached again"
                    level = EventLevel.INFO
                ctx.record("resource", host.label, message, level=level)
                ctx.commit()
                return
            known = {
                p.name
                for p in list_partitions(ctx, host=str(host.resource_id))
                if p.hypervisor == self.driver.name
            }
            ctx.commit()
            if observation.name not in known:
                return
            try:
                if observation.state == "undefined":
                    sync_host(ctx, host.resource_id)
                else:
                    observe_partition_state(
                        ctx, host.resource_id, observation.name, observation.state, observation.reason
                    )
            except QrmError as exc:
                ctx.rollback()
                log.warning(
                    "%s: recording %s %s on %s failed: %s",
                    self.actor,
                    observation.name,
                    observation.state,
                    host.label,
                    exc.message,
                )


def lifecycle_services(driver_class: type[LibvirtHypervisor], ctx: HookContext) -> list[Any]:
    """The watcher of ``driver_class``'s hosts for ``qrm server`` (none without libvirt-python,
    or with ``QRM_LIBVIRT_WATCH=false``)."""
    conf = LibvirtSettings.load()
    if not conf.watch:
        return []
    problem = binding.missing()
    if problem:
        ctx.log.warning("%s: not following lifecycle events: %s", driver_class.name, problem[0])
        return []
    from qrm_libvirt.watcher import LifecycleWatcher

    driver = driver_class(ctx.settings)
    recorder = Recorder(driver, ctx.settings)
    return [LifecycleWatcher(driver, recorder.hosts, recorder, refresh=conf.watch_refresh)]
