"""Following partitions through libvirt's lifecycle events, not by polling.

:class:`LifecycleWatcher` is the background service (``qrm_collect_services``)
each libvirt plugin runs inside ``qrm server``. For every host of its
hypervisor it keeps the pooled connection open and registers a
``VIR_DOMAIN_EVENT_ID_LIFECYCLE`` callback (``domainEventRegisterAny``);
libvirt's event loop thread delivers each event at once, and a worker thread
hands it to qrm (``observe``), which records the partition's new state and an
event. A partition paused or destroyed behind qrm's back is therefore seen
within a second.

* **Hosts come and go.** The host list is read again every ``refresh``
  seconds (a database read, not a libvirt poll); new hosts are connected,
  removed ones forgotten.
* **Connections break.** The pool tells the watcher about every (re)opened
  connection; the watcher registers its callback again and reconciles once
  (one ``list_partitions`` sweep: what changed while nobody listened). A
  host that cannot be reached is reported once (``unreachable``), and again
  when it is back.
* **Migration is not a failure.** The source's pause, stop and undefine at
  the end of a live migration are recognised (:func:`qrm_libvirt.events.interpret`
  and the undefine that follows a stop-by-migration) and not reported; the
  destination reports the partition running there.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qrm_core.plugin_api import HostTarget, QrmError
from qrm_libvirt.binding import libvirt
from qrm_libvirt.connections import ConnectionPool
from qrm_libvirt.driver import LibvirtHypervisor
from qrm_libvirt.events import Lifecycle, interpret

log = logging.getLogger("qrm.libvirt")


@dataclass(frozen=True)
class Observation:
    """What the watcher tells qrm: ``name`` on ``host`` is now ``state`` (``reason``).

    ``state`` is ``running``, ``paused``, ``stopped``, ``undefined`` (the
    domain is gone) or, with ``name`` None, ``unreachable``/``reachable`` for
    the host itself.
    """

    host: HostTarget
    name: str | None
    state: str
    reason: str


Observer = Callable[[Observation], None]


class LifecycleWatcher:
    """Follows every host of one hypervisor (a :class:`~qrm_core.plugin_api.BackgroundService`).

    :param driver: The plugin's driver (URIs, and the reconciling sweep).
    :param hosts: Returns the hosts to watch (read from qrm's database).
    :param observe: Called (in the watcher's worker thread) for every observation.
    :param refresh: Seconds between two reads of the host list.
    """

    def __init__(
        self,
        driver: LibvirtHypervisor,
        hosts: Callable[[], list[HostTarget]],
        observe: Observer,
        *,
        pool: ConnectionPool | None = None,
        refresh: float = 10.0,
    ) -> None:
        self.name = f"{driver.name}-lifecycle"
        self.driver = driver
        self.hosts = hosts
        self.observe = observe
        self.refresh = refresh
        self._pool = pool or driver.pool()
        self._watched: dict[str, HostTarget] = {}
        self._callbacks: dict[str, tuple[Any, int]] = {}
        self._unreachable: set[str] = set()
        self._migrating: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()

    # -- the service -----------------------------------------------------------

    def start(self) -> None:
        self._pool.add_open_listener(self._opened)
        self._stop.clear()
        for target, label in ((self._watch_hosts, "hosts"), (self._work, "worker")):
            thread = threading.Thread(target=target, name=f"qrm-{self.name}-{label}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._ready.wait(self.refresh + 30)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._pool.remove_open_listener(self._opened)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        with self._lock:
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
            self._watched.clear()
        for conn, callback_id in callbacks:
            with contextlib.suppress(Exception):
                conn.domainEventDeregisterAny(callback_id)

    # -- hosts -------------------------------------------------------------------

    def _watch_hosts(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_hosts()
            except Exception:
                log.exception("%s: reading the hosts failed", self.name)
            self._ready.set()
            self._stop.wait(self.refresh)

    def sync_hosts(self) -> None:
        """Watch the hosts ``hosts()`` returns now: connect new ones, forget removed ones."""
        wanted: dict[str, HostTarget] = {}
        for host in self.hosts():
            try:
                self.driver.validate_host(host)
                wanted[self.driver.uri(host)] = host
            except QrmError as exc:
                log.warning("%s: not watching host %s: %s", self.name, host.label, exc.message)
        with self._lock:
            gone = [uri for uri in self._watched if uri not in wanted]
            for uri in gone:
                self._watched.pop(uri)
            self._watched.update(wanted)
        for uri in gone:
            self._forget(uri)
        for uri, host in wanted.items():
            if self._stop.is_set():
                return
            registered = uri in self._callbacks
            try:
                conn = self._pool.get(uri, host.label)  # calls _opened for a new connection
            except QrmError as exc:
                self._lost(uri, host, exc.message)
                continue
            if not registered and uri not in self._callbacks:
                self._opened(uri, conn)  # a connection the pool had open before we listened

    def _forget(self, uri: str) -> None:
        with self._lock:
            found = self._callbacks.pop(uri, None)
            self._unreachable.discard(uri)
        if found is not None:
            with contextlib.suppress(Exception):
                found[0].domainEventDeregisterAny(found[1])

    def _lost(self, uri: str, host: HostTarget, why: str) -> None:
        with self._lock:
            self._callbacks.pop(uri, None)
            first = uri not in self._unreachable
            self._unreachable.add(uri)
        if first:
            self._queue.put(("observe", Observation(host, None, "unreachable", why)))

    def _opened(self, uri: str, conn: Any) -> None:
        """A connection to ``uri`` was opened (first time or again): listen on it and catch up."""
        with self._lock:
            host = self._watched.get(uri)
            if host is None:
                return
            previous = self._callbacks.get(uri)
        if previous is not None and previous[0] is conn:
            return
        lv = libvirt()
        try:
            callback_id = conn.domainEventRegisterAny(
                None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, uri
            )
        except lv.libvirtError as exc:
            log.warning("%s: cannot listen to host %s: %s", self.name, host.label, exc)
            return
        with self._lock:
            self._callbacks[uri] = (conn, callback_id)
            back = uri in self._unreachable
            self._unreachable.discard(uri)
        if back:
            self._queue.put(("observe", Observation(host, None, "reachable", "connected again")))
        self._queue.put(("sweep", uri))

    # -- events ------------------------------------------------------------------

    def _event(self, _conn: Any, dom: Any, event: int, detail: int, uri: str) -> None:
        """libvirt's event loop thread: decide quickly, hand over to the worker."""
        lv = libvirt()
        name = dom.name()
        key = (uri, name)
        if event == lv.VIR_DOMAIN_EVENT_STOPPED and detail == lv.VIR_DOMAIN_EVENT_STOPPED_MIGRATED:
            self._migrating.add(key)
            return
        if event == lv.VIR_DOMAIN_EVENT_UNDEFINED and key in self._migrating:
            self._migrating.discard(key)  # the source forgets a partition that moved away
            return
        if event == lv.VIR_DOMAIN_EVENT_STARTED:
            self._migrating.discard(key)
        meaning = interpret(event, detail)
        if meaning is not None:
            self._queue.put(("event", (uri, name, meaning)))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            kind, payload = item
            try:
                if kind == "event":
                    uri, name, meaning = payload
                    self._deliver(uri, name, meaning)
                elif kind == "sweep":
                    self._sweep(payload)
                else:
                    self.observe(payload)
            except Exception:
                log.exception("%s: handling %s failed", self.name, kind)

    def _deliver(self, uri: str, name: str, meaning: Lifecycle) -> None:
        with self._lock:
            host = self._watched.get(uri)
        if host is not None:
            self.observe(Observation(host, name, meaning.state, meaning.reason))

    def _sweep(self, uri: str) -> None:
        """After a (re)connection: the state of every partition, once."""
        with self._lock:
            host = self._watched.get(uri)
        if host is None:
            return
        try:
            partitions = self.driver.list_partitions(host)
        except QrmError as exc:
            self._lost(uri, host, exc.message)
            return
        for partition in partitions:
            self.observe(Observation(host, partition.name, partition.state, "found on connecting"))
