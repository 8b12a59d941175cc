"""The engine thread of ``qrm server``: takes the leader lock and reconciles."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from qrm_core.db import get_engine
from qrm_core.engine.leader import LeaderLock
from qrm_core.engine.reconciler import Reconciler, TickReport
from qrm_core.errors import QrmError

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem

log = logging.getLogger("qrm.engine")


class EngineRunner:
    """Runs reconcile passes every ``interval`` seconds, or sooner when woken.

    Only while holding the leader lock; a follower retries the lock every
    interval and takes over when the leader dies.
    """

    def __init__(
        self,
        settings: Settings,
        plugins: PluginSystem,
        *,
        interval: float = 1.0,
        on_tick: Callable[[TickReport], None] | None = None,
        on_leadership: Callable[[bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.reconciler = Reconciler(settings, plugins)
        self.lock = LeaderLock(get_engine(settings))
        self.interval = interval
        self.on_tick = on_tick
        #: Called in the engine thread with True when this server becomes the
        #: leader and False when it stops being one (also when it stops).
        self.on_leadership = on_leadership
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.is_leader = False
        self.ticks = 0
        #: The last pass left VEs waiting for resources (read by the agent endpoints).
        self.waiting_for_resources = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qrm-engine", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run a pass soon (after a start/stop request)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.lock.release()
        if self.is_leader:
            self._tell_leadership(False)
        self.is_leader = False

    def _tell_leadership(self, leader: bool) -> None:
        if self.on_leadership is None:
            return
        try:
            self.on_leadership(leader)
        except Exception:
            log.exception("engine: telling the leader-only services failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                leader = self.lock.try_acquire()
                if not leader:
                    self.waiting_for_resources = False  # the leader's engine places
                if leader != self.is_leader:
                    log.info("engine: %s", "leader, reconciling" if leader else "follower, waiting")
                    if leader:
                        self.reconciler.became_leader()
                    self.is_leader = leader
                    self._tell_leadership(leader)
                if leader:
                    report = self.reconciler.tick()
                    self.ticks += 1
                    busy = report.busy
                    self.waiting_for_resources = report.waiting > 0
                    if self.on_tick is not None:
                        self.on_tick(report)
            except QrmError as exc:
                log.error("engine pass failed: %s", exc.message)
            except Exception:
                log.exception("engine pass failed")
            # A pass that changed something is followed by another soon: the
            # next step (e.g. state derivation after an assignment) is ready.
            self._wake.wait(0.05 if busy else self.interval)
            self._wake.clear()
        # Leave the loop promptly; the lock is released by stop().
        time.sleep(0)
