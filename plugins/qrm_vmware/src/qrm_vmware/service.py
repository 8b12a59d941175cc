"""What ``qrm server`` runs for qrm-vmware: a periodic sync and a watcher of vCenter's updates.

* :class:`SyncService` syncs every connection every
  ``QRM_VMWARE_SYNC_INTERVAL`` seconds (and at once when a watcher asks):
  hosts, clusters and their capacity, and a full check of qrm's VMs.
* :class:`Watcher` (one per connection, with ``QRM_VMWARE_WATCH``) follows
  vCenter's own updates (``WaitForUpdatesEx`` on a private PropertyCollector
  with a filter over a ContainerView of every VM: power state, host, notes)
  and tells core at once when one of qrm's VMs is powered on or off,
  suspended or moved; a VM that disappears triggers a full sync, which
  decides whether it is gone. No polling per VM.

Both run on every qrm server that has the plugin; what they tell core is
idempotent, so two servers on one database do the same work twice but
record each change once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from pyVmomi import vim, vmodl

from qrm_core.plugin_api import QrmError, observe_partitions, read_context, service_context
from qrm_vmware import refs, sync, vsphere
from qrm_vmware.connections import ConnectionStore
from qrm_vmware.settings import VmwareSettings

log = logging.getLogger("qrm.plugins.vmware")
PC = vmodl.query.PropertyCollector
WATCH_PATHS = ["runtime.powerState", "runtime.host", "config.annotation"]
#: Seconds between two looks for connections made or removed meanwhile.
CONNECTION_CHECK = 30.0


class Watcher:
    """Follows one connection's VMs through WaitForUpdatesEx."""

    def __init__(
        self, core: Any, name: str, settings: VmwareSettings, request_sync: Any, plugins: Any = None
    ) -> None:
        self.core = core
        self.name = name
        self.settings = settings
        self.request_sync = request_sync
        self.plugins = plugins
        self._stop = threading.Event()
        self._collector: Any = None
        self._thread = threading.Thread(target=self._run, name=f"vmware-watch-{name}", daemon=True)
        #: VM moid -> its watched properties (every VM, to know qrm's when they change)
        self.vms: dict[str, dict[str, Any]] = {}
        self.updates = 0
        self.ready = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        collector = self._collector
        if collector is not None:
            with contextlib.suppress(Exception):
                collector.CancelWaitForUpdates()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self._watch()
                backoff = 1.0
            except vim.fault.NotAuthenticated:
                vsphere.POOL.forget(self.name)
            except QrmError as exc:
                log.warning("vmware: watching vCenter %s: %s", self.name, exc.message)
            except vmodl.fault.RequestCanceled:
                pass
            except Exception:
                log.exception("vmware: watching vCenter %s failed", self.name)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 60.0)

    def _watch(self) -> None:
        connection = sync.read_connection(self.core, self.settings, self.name)
        session = vsphere.POOL.session(connection, self.settings)
        content = session.content
        collector = session.call(
            "creating a PropertyCollector", content.propertyCollector.CreatePropertyCollector
        )
        view = None
        self._collector = collector
        try:
            view = session.call(
                "creating a view of every VM",
                content.viewManager.CreateContainerView,
                container=content.rootFolder,
                type=[vim.VirtualMachine],
                recursive=True,
            )
            session.call(
                "watching the VMs",
                collector.CreateFilter,
                PC.FilterSpec(
                    objectSet=[
                        PC.ObjectSpec(
                            obj=view,
                            skip=True,
                            selectSet=[
                                PC.TraversalSpec(name="view", type=vim.view.ContainerView, path="view")
                            ],
                        )
                    ],
                    propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=WATCH_PATHS)],
                ),
                partialUpdates=True,
            )
            version = ""
            self.vms = {}
            while not self._stop.is_set():
                update = collector.WaitForUpdatesEx(
                    version=version, options=PC.WaitOptions(maxWaitSeconds=10)
                )
                if update is None:
                    self.ready.set()
                    continue
                version = update.version
                self._apply(update)
                self.ready.set()
        finally:
            self._collector = None
            with contextlib.suppress(Exception):
                collector.DestroyPropertyCollector()
            if view is not None:
                with contextlib.suppress(Exception):
                    view.Destroy()

    def _apply(self, update: Any) -> None:
        changed: set[str] = set()
        left = False
        for filter_update in update.filterSet or ():
            for change in filter_update.objectSet or ():
                moid = str(change.obj._moId)
                if change.kind == "leave":
                    props = self.vms.pop(moid, None)
                    if props is not None and refs.parse_marker(props.get("config.annotation")):
                        left = True
                    continue
                props = self.vms.setdefault(moid, {})
                for item in change.changeSet or ():
                    if item.op == "remove":
                        props.pop(item.name, None)
                    else:
                        props[item.name] = item.val
                changed.add(moid)
        self.updates += 1
        seen: dict[str, Any] = {}
        for moid in changed:
            props = self.vms.get(moid, {})
            marker = refs.parse_marker(props.get("config.annotation"))
            if marker is None or marker.creating:
                continue
            host = props.get("runtime.host")
            power = str(props.get("runtime.powerState") or "poweredOff")
            vm = sync.inventory.Vm(
                moid=moid, power=power, host=str(getattr(host, "_moId", "") or ""), marker=marker
            )
            seen.update(sync.observed(self.name, [vm]))
        if seen:
            with service_context(self.core, actor=f"vmware-watch:{self.name}", plugins=self.plugins) as ctx:
                changes = observe_partitions(ctx, sync.manager_name(self.name), seen, complete=False)
            if changes:
                log.info("vmware: vCenter %s: %s", self.name, "; ".join(changes))
        if left:
            self.request_sync(self.name)


class SyncService:
    """The periodic sync of every connection, and a watcher per connection (a BackgroundService).

    Leader-only: of the servers sharing one database, only the engine's leader
    syncs and watches vCenter (one session, one set of events per site); the next
    leader takes over, so ``start()`` works again after ``stop()``.
    """

    name = "vmware-sync"
    leader_only = True

    def __init__(self, core: Any, settings: VmwareSettings, plugins: Any = None) -> None:
        self.core = core
        self.settings = settings
        self.plugins = plugins
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._wanted: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vmware-sync", daemon=True)
        self.watchers: dict[str, Watcher] = {}
        self.passes = 0

    def start(self) -> None:
        if self._thread.is_alive():
            return
        if self._thread.ident is not None:  # started and stopped before: a new life
            self._stop.clear()
            self._wake.clear()
            self._thread = threading.Thread(target=self._run, name="vmware-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(30)
        for watcher in list(self.watchers.values()):
            watcher.stop()
        self.watchers.clear()
        vsphere.POOL.close()

    def request_sync(self, name: str | None = None) -> None:
        """Sync ``name`` (every connection if None) soon."""
        with self._lock:
            self._wanted.add(name or "*")
        self._wake.set()

    def _connections(self) -> list[str]:
        with read_context(self.core) as ctx:  # no plugin system needed to read
            return [c.name for c in ConnectionStore(self.core, self.settings).list(ctx)]

    def _run(self) -> None:
        next_full = 0.0
        seen: set[str] = set()
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                wanted, self._wanted = self._wanted, set()
            try:
                names = self._connections()
            except QrmError as exc:
                log.warning("vmware: cannot read the connections: %s", exc.message)
                names = []
            self._keep_watchers(names)
            if now >= next_full or "*" in wanted:
                todo = names
                next_full = now + self.settings.sync_interval
            else:
                # A connection made since the last look ('qrm vmware connect' on this
                # site) is synced at once, not at the next full sync.
                todo = [n for n in names if n in wanted or n not in seen]
            seen = set(names)
            for name in todo:
                if self._stop.is_set():
                    break
                self.sync_one(name)
            self.passes += 1
            # Look for new connections at least every CONNECTION_CHECK seconds.
            wait = min(next_full - time.monotonic(), self.settings.sync_interval, CONNECTION_CHECK)
            self._wake.wait(max(0.0, wait))
            self._wake.clear()

    def sync_one(self, name: str) -> None:
        try:
            result = sync.sync_connection(self.core, name, plugins=self.plugins, settings=self.settings)
            log.info("vmware: synced vCenter %s: %s", name, result.summary())
        except QrmError as exc:
            log.warning("vmware: sync of vCenter %s failed: %s", name, exc.message)
            with contextlib.suppress(QrmError):
                sync.note_failure(self.core, name, exc.message, plugins=self.plugins)
        except Exception:
            log.exception("vmware: sync of vCenter %s failed", name)

    def _keep_watchers(self, names: list[str]) -> None:
        if not self.settings.watch:
            return
        for name in list(self.watchers):
            if name not in names or not self.watchers[name].alive:
                self.watchers.pop(name).stop()
        for name in names:
            if name not in self.watchers:
                watcher = Watcher(self.core, name, self.settings, self.request_sync, self.plugins)
                self.watchers[name] = watcher
                watcher.start()
