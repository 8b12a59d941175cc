"""One libvirt connection per host URI and process: opened on first use, kept
alive, and opened again when it breaks.

* **Keepalive.** Every connection sends libvirt keepalive messages
  (``setKeepAlive(interval, count)``): a host that stops answering is taken
  for dead after ``interval * count`` seconds and its connection closed.
* **Reconnect.** A close callback (``registerCloseCallback``) drops a closed
  connection from the pool; the next use opens a fresh one. Listeners
  (the state watcher) are told about every new connection so that they can
  register their event callbacks again.
* **Bounded open.** Opening ``qemu+ssh://...`` to a host that does not answer
  can block for minutes in ssh; the pool opens in a helper thread and gives
  up after ``connect_timeout`` seconds with "cannot reach host ...".

The pool is thread-safe; libvirt connections themselves may be used from
several threads at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qrm_libvirt.binding import libvirt
from qrm_libvirt.errors import is_connection_error, message_of, unreachable
from qrm_libvirt.events import ensure_event_loop

log = logging.getLogger("qrm.libvirt")

#: Called with (uri, connection) after every successful open (first or again).
OpenListener = Callable[[str, Any], None]


@dataclass
class _Entry:
    conn: Any
    opened: float
    closed: bool = False


@dataclass
class ConnectionPool:
    """Connections by URI. ``connect_timeout`` in seconds; keepalive every
    ``keepalive_interval`` seconds, dead after ``keepalive_count`` unanswered."""

    connect_timeout: float = 15.0
    keepalive_interval: int = 5
    keepalive_count: int = 3
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _listeners: list[OpenListener] = field(default_factory=list)
    #: Why each URI could not be reached last, with its host's name (cleared on a successful open).
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)

    def add_open_listener(self, listener: OpenListener) -> None:
        with self._guard:
            self._listeners.append(listener)

    def remove_open_listener(self, listener: OpenListener) -> None:
        with self._guard:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

    def _lock_for(self, uri: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(uri, threading.Lock())

    def get(self, uri: str, host: str) -> Any:
        """A live connection to ``uri`` (``host`` names it in errors), opened if needed."""
        entry = self._entries.get(uri)
        if entry is not None and not entry.closed:
            # A broken connection is noticed by keepalive or the close callback, or fails
            # the next call, which call() retries on a fresh one.
            return entry.conn
        with self._lock_for(uri):
            entry = self._entries.get(uri)
            if entry is not None and not entry.closed and _alive(entry.conn):
                return entry.conn
            if entry is not None:
                self._discard(uri, entry)
            conn = self._open(uri, host)
            self._entries[uri] = _Entry(conn=conn, opened=time.monotonic())
            self.failures.pop(uri, None)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(uri, conn)
            except Exception:
                log.exception("libvirt connection listener failed for %s", uri)
        return conn

    def _open(self, uri: str, host: str) -> Any:
        lv = libvirt()
        ensure_event_loop()
        result: dict[str, Any] = {}
        gave_up = threading.Event()

        def attempt() -> None:
            try:
                conn = lv.open(uri)
            except lv.libvirtError as exc:
                result["error"] = message_of(exc)
                return
            if gave_up.is_set():  # too late: nobody wants it any more
                with contextlib.suppress(Exception):
                    conn.close()
                return
            result["conn"] = conn

        thread = threading.Thread(target=attempt, name=f"qrm-libvirt-open-{host}", daemon=True)
        thread.start()
        thread.join(self.connect_timeout)
        if thread.is_alive():
            gave_up.set()
            reason = f"no answer within {self.connect_timeout:g} s"
            self.failures[uri] = (host, reason)
            raise unreachable(host, uri, reason)
        if "error" in result:
            self.failures[uri] = (host, result["error"])
            raise unreachable(host, uri, result["error"])
        conn = result["conn"]
        if self.keepalive_interval > 0 and _is_remote(uri):
            try:
                conn.setKeepAlive(self.keepalive_interval, self.keepalive_count)
            except lv.libvirtError as exc:
                log.debug("no keepalive on %s: %s", uri, message_of(exc))

        def closed(_conn: Any, reason: int, _opaque: Any) -> None:
            entry = self._entries.get(uri)
            if entry is not None and entry.conn is conn:
                entry.closed = True
                self.failures[uri] = (host, f"connection closed ({_close_reason(reason)})")
            log.info("libvirt connection to %s closed (%s)", uri, _close_reason(reason))

        try:
            conn.registerCloseCallback(closed, None)
        except lv.libvirtError as exc:  # the test driver has no close callbacks
            log.debug("no close callback on %s: %s", uri, message_of(exc))
        return conn

    def _discard(self, uri: str, entry: _Entry) -> None:
        self._entries.pop(uri, None)
        with contextlib.suppress(Exception):
            entry.conn.unregisterCloseCallback()
        with contextlib.suppress(Exception):
            entry.conn.close()

    def drop(self, uri: str) -> None:
        """Forget (and close) the connection to ``uri``; the next :meth:`get` opens a new one."""
        with self._lock_for(uri):
            entry = self._entries.get(uri)
            if entry is not None:
                self._discard(uri, entry)

    def call(self, uri: str, host: str, work: Callable[[Any], Any], *, retry: bool = True) -> Any:
        """``work(connection)``; if the connection turns out broken, once more on a fresh one.

        Use ``retry=False`` for work that must not run twice (it may have
        reached the host before the connection broke).
        """
        conn = self.get(uri, host)
        try:
            return work(conn)
        except libvirt().libvirtError as exc:
            if not (retry and is_connection_error(exc)):
                raise
            self.drop(uri)
        return work(self.get(uri, host))

    def open_uris(self) -> list[str]:
        return [uri for uri, entry in self._entries.items() if not entry.closed]

    def close_all(self) -> None:
        for uri in list(self._entries):
            self.drop(uri)


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except Exception:  # noqa: BLE001 - a closed handle raises
        return False


def _is_remote(uri: str) -> bool:
    """Keepalive exists only on remote (RPC) connections: not on test:/// and xen:/// in-process drivers."""
    return not uri.startswith("test:")


def _close_reason(reason: int) -> str:
    lv = libvirt()
    return {
        lv.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
        lv.VIR_CONNECT_CLOSE_REASON_EOF: "the host closed it",
        lv.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timed out",
        lv.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by qrm",
    }.get(reason, f"reason {reason}")


_pool: ConnectionPool | None = None
_pool_lock = threading.Lock()


def pool() -> ConnectionPool:
    """The process-wide pool (both plugins' drivers share it)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ConnectionPool()
    return _pool
