"""Reservations written beside the requests that caused them, inside ``qrm server``.

A registration used to return only once its reservation was in the DHCP
server (a statement in Kea's hosts database, a ``config-set`` of Kea's whole
configuration, an OMAPI call to ISC dhcpd). When a rack powers on, that wait
sat in every registration's request: a round trip to PostgreSQL per group of
registrations, a second or more per Kea rewrite at 10,000 resources.

While this writer runs (a background service of every ``qrm server`` where
DHCP is configured), the resource hooks only queue the change and return.
The writer waits a moment for more (``LINGER``, 20 ms: in a burst of
registrations that makes rounds of several changes), takes everything queued, keeps the last change of each MAC (a
change is the whole wanted state of that MAC: reserved with these values, or
not reserved), and applies them all at once, each in a thread of its own, so
the backends' own sharing works as before: changes written together share a
statement in the hosts database (group commit) and a Kea rewrite. The next
round starts when this one has finished, so two changes of one MAC are never
applied out of order. Where the backend writes reservations together (Kea's
hosts database on PostgreSQL) a round is one call (``apply_many``) instead of
a thread per change.

Nothing a machine needs waits for this: a machine that registered got its
address from the pool already, and its reservation (the same address, its
name) is in place within a round, long before it is told to reboot. A change
that fails is recorded as an error event of the plugin, as before, and
``qrm dhcpd sync`` brings the server in step at any time. Outside the server
(the CLI, tests without a server) nothing is queued: a hook writes before it
returns, as the commands that caused it expect.

On stop the writer applies what is still queued before it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qrm_core.plugin_api import HookContext, ResourcePublic

log = logging.getLogger("qrm.plugins.dhcpd")

#: ``apply(ctx, action, resource)``: the plugin's own single change.
Apply = Callable[["HookContext", str, "ResourcePublic"], None]
Change = tuple["HookContext", str, "ResourcePublic"]
#: ``apply_many(changes)``: a round's changes, written together where the backend can;
#: returns those it left to ``apply``.
ApplyMany = Callable[[list[Change]], list[Change]]

#: At most this many changes are applied at once (threads of a round).
MAX_PARALLEL = 32
#: How long a round waits for more changes once the first one is queued (seconds):
#: in a burst of registrations it makes rounds of several changes (one statement in
#: the hosts database instead of one each), and it is nothing beside a machine's reboot.
LINGER = 0.02
#: A round starts at once when this many changes are queued.
FULL_ROUND = 500

_current: ReservationWriter | None = None
_current_lock = threading.Lock()


def submit(ctx: HookContext, action: str, resource: ResourcePublic) -> bool:
    """Queue a change for the running writer; False when none runs (write it now)."""
    writer = _current
    return writer is not None and writer.queue(ctx, action, resource)


def current() -> ReservationWriter | None:
    """The writer of this process, while it runs."""
    return _current


class ReservationWriter:
    """The plugin's background service that applies queued reservation changes."""

    name = "dhcpd-reservations"

    def __init__(self, apply: Apply, apply_many: ApplyMany | None = None, *, linger: float = LINGER) -> None:
        self._apply = apply
        self._apply_many = apply_many
        self.linger = linger
        self._cond = threading.Condition()
        self._queue: dict[str, tuple[HookContext, str, ResourcePublic]] = {}
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        #: Rounds applied and changes in them (tests and logs read them).
        self.rounds = 0
        self.applied = 0

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        global _current
        with self._cond:
            self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=MAX_PARALLEL, thread_name_prefix="dhcpd-reserve")
        self._thread = threading.Thread(target=self._run, name="dhcpd-reservations", daemon=True)
        self._thread.start()
        with _current_lock:
            _current = self

    def stop(self) -> None:
        """Stop queueing (hooks write at once again), apply what is queued, end."""
        global _current
        with _current_lock:
            if _current is self:
                _current = None
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(120)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- queue --------------------------------------------------------------

    def queue(self, ctx: HookContext, action: str, resource: ResourcePublic) -> bool:
        with self._cond:
            if self._stopping:
                return False
            # The last change of a MAC is its wanted state; a later one replaces
            # an earlier one not yet applied (and moves to the end of the round).
            self._queue.pop(resource.mac, None)
            self._queue[resource.mac] = (ctx, action, resource)
            # The writer needs waking for the first change of a round (it then waits
            # LINGER for more) and when a round is full; waking it for each change of a
            # burst only had it check the clock and sleep again, in the server's GIL.
            if len(self._queue) == 1 or len(self._queue) >= FULL_ROUND:
                self._cond.notify_all()
        return True

    def pending(self) -> int:
        """Changes queued or being applied."""
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every change queued before this call is applied; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- the writer thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:  # stopping, nothing left
                    return
                deadline = time.monotonic() + self.linger
                while not self._stopping and len(self._queue) < FULL_ROUND:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = list(self._queue.values())
                self._queue = {}
                self._busy = True
            try:
                self._round(batch)
            except Exception:  # the writer must outlive one bad round
                log.exception("dhcpd: a round of %d reservation changes failed", len(batch))
            finally:
                with self._cond:
                    self._busy = False
                    self.rounds += 1
                    self.applied += len(batch)
                    self._cond.notify_all()

    def _round(self, batch: list[Change]) -> None:
        if self._apply_many is not None and len(batch) > 1:
            batch = self._apply_many(batch)
        if len(batch) == 1 or self._pool is None:
            for ctx, action, resource in batch:
                self._apply(ctx, action, resource)
            return
        futures = [self._pool.submit(self._apply, ctx, action, resource) for ctx, action, resource in batch]
        for future in futures:
            future.result()  # _apply records its own failures and does not raise
