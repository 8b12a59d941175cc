"""libvirt's event loop, run by one thread per process, and what lifecycle events mean to qrm.

libvirt delivers domain events and keeps connections alive (keepalive
messages, close callbacks) only while an event loop runs. The default
implementation must be registered *before* the first connection is opened
that should use it, so :func:`ensure_event_loop` is called by the connection
pool before every open. The loop runs in a daemon thread for the life of the
process; every callback runs in that thread, so callbacks must be quick and
must not call back into libvirt on the same connection in a way that waits
for the loop (they hand work to another thread instead).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

from qrm_libvirt.binding import libvirt

log = logging.getLogger("qrm.libvirt")

_lock = threading.Lock()
_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and start its thread, once per process."""
    global _thread
    if _thread is not None:
        return
    with _lock:
        if _thread is not None:
            return
        module = libvirt()
        module.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    module.virEventRunDefaultImpl()
                except Exception:
                    log.exception("libvirt event loop iteration failed")

        thread = threading.Thread(target=run, name="qrm-libvirt-events", daemon=True)
        thread.start()
        _thread = thread


def event_loop_running() -> bool:
    return _thread is not None and _thread.is_alive()


@dataclass(frozen=True)
class Lifecycle:
    """What a lifecycle event means for a partition.

    :ivar state: ``running``, ``paused``, ``stopped`` or ``undefined`` (gone).
    :ivar reason: One word or two for people (``destroyed``, ``shut down``, ``paused``).
    """

    state: str
    reason: str


@functools.cache
def _names(prefix: str) -> dict[int, str]:
    module = libvirt()
    found = {}
    for attr in dir(module):
        if attr.startswith(prefix) and not attr.endswith("_LAST"):
            found[getattr(module, attr)] = attr[len(prefix) :].lower().replace("_", " ")
    return found


def interpret(event: int, detail: int) -> Lifecycle | None:
    """The partition state a ``VIR_DOMAIN_EVENT_*`` (with its detail) leads to; None: no change.

    Migration shows on the source as suspended (migrated), stopped (migrated)
    and, with the source undefined, undefined; on the destination as started
    (migrated) and resumed (migrated). The pause at the end of a live
    migration is not a pause anyone asked for, and the source's stop is not a
    failure: both give None here; the watcher treats the undefine that
    follows a stopped-by-migration as part of the migration too.
    """
    lv = libvirt()
    if event == lv.VIR_DOMAIN_EVENT_STARTED:
        return Lifecycle("running", _detail("VIR_DOMAIN_EVENT_STARTED_", detail, "started"))
    if event == lv.VIR_DOMAIN_EVENT_RESUMED:
        return Lifecycle("running", "resumed")
    if event == lv.VIR_DOMAIN_EVENT_SUSPENDED:
        if detail in (
            lv.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED,
            getattr(lv, "VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY", -1),
        ):
            return None
        return Lifecycle("paused", _detail("VIR_DOMAIN_EVENT_SUSPENDED_", detail, "paused"))
    if event == lv.VIR_DOMAIN_EVENT_STOPPED:
        if detail == lv.VIR_DOMAIN_EVENT_STOPPED_MIGRATED:
            return None
        reasons = {
            lv.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down",
            lv.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
            lv.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
            lv.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
            lv.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
        }
        return Lifecycle("stopped", reasons.get(detail, "stopped"))
    if event == lv.VIR_DOMAIN_EVENT_CRASHED:
        return Lifecycle("stopped", "crashed")
    if event == getattr(lv, "VIR_DOMAIN_EVENT_PMSUSPENDED", -1):
        return Lifecycle("paused", "suspended by its OS")
    if event == lv.VIR_DOMAIN_EVENT_UNDEFINED:
        return Lifecycle("undefined", "undefined")
    # DEFINED (a new or changed definition) and SHUTDOWN (the guest began to shut
    # down; STOPPED follows) change no state.
    return None


def _detail(prefix: str, detail: int, default: str) -> str:
    return _names(prefix).get(detail, default)


@functools.cache
def _state_names() -> dict[int, str]:
    lv = libvirt()
    return {
        lv.VIR_DOMAIN_RUNNING: "running",
        lv.VIR_DOMAIN_BLOCKED: "running",
        lv.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down: still running
        lv.VIR_DOMAIN_PAUSED: "paused",
        lv.VIR_DOMAIN_PMSUSPENDED: "paused",
    }


def domain_state(code: int) -> str:
    """qrm's partition state for a ``VIR_DOMAIN_*`` state code (``dom.state()[0]``)."""
    return _state_names().get(code, "stopped")  # SHUTOFF, CRASHED, NOSTATE
