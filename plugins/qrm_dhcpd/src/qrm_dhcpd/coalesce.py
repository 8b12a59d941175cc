"""Group commit for Kea's whole-configuration rewrites.

Without a hosts database, every change to a reservation is a rewrite of
Kea's whole configuration (read every resource, render, ``config-test`` +
``config-set``, write the file): about 0.2 s at 1,000 resources and up to
1 s at 10,000. When a rack powers on, hundreds of registrations arrive at
once, each hook runs in its own request thread, and one rewrite per change
would queue them up for minutes.

A rewrite reads the database *when it starts*, so one rewrite covers every
change committed before that moment. The coordinator uses this: while a
rewrite runs, the changes that arrive wait together in one batch; when the
rewrite ends, one member of the batch runs ONE new rewrite for all of them,
and every member returns with its outcome (its value, or its error). So:

* a caller never returns before a rewrite that *started after its call
  began* has finished: its row (committed before the hook was called) is in
  that rewrite, and in Kea, when the hook returns - as with one rewrite per
  change;
* a burst of K changes costs about one rewrite per rewrite duration instead
  of K, and no caller waits longer than about two rewrites;
* rewrites of one Kea never overlap. (Before, two concurrent changes could
  each read the database and the one that read first could ``config-set``
  last, dropping the other's reservation from the running Kea until the next
  change.)

There is one coordinator per Kea instance (its configuration file and
control socket) per process, whatever number of backend objects are made.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from qrm_core.plugin_api import PluginError

T = TypeVar("T")


class _Batch(Generic[T]):
    """Callers served by one rewrite; open to newcomers until that rewrite starts."""

    __slots__ = ("done", "error", "members", "open", "value", "work")

    def __init__(self, work: Callable[[], T], *, open: bool) -> None:
        self.members = 0
        self.work = work
        self.open = open
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None


class RewriteCoordinator:
    """Runs rewrites one at a time; changes that arrive during one share the next."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._queue: deque[_Batch[Any]] = deque()
        self._busy = False
        #: Rewrites run so far (each shared batch and each exclusive run counts once).
        self.rewrites = 0
        #: Callers served so far.
        self.callers = 0

    @property
    def busy(self) -> bool:
        """Whether a rewrite is running now."""
        with self._cond:
            return self._busy

    def waiting(self) -> int:
        """Callers queued for a rewrite that has not started yet."""
        with self._cond:
            return sum(batch.members for batch in self._queue)

    def run(self, work: Callable[[], T], *, share: bool = True) -> tuple[T, int]:
        """Have ``work`` done by a rewrite that starts after this call; its value and how many callers it served.

        With ``share`` the call joins the batch waiting for the next rewrite
        (or opens one); the rewrite runs the ``work`` of the member that
        joined last (the most recently loaded settings) and its value or
        error goes to every member. Without ``share`` the call gets a
        rewrite of its own, in turn with the others (``qrm dhcpd sync``, and
        the benchmark's "one rewrite per change" baseline).
        """
        with self._cond:
            last = self._queue[-1] if self._queue else None
            if share and last is not None and last.open:
                batch = last
            else:
                batch = _Batch(work, open=share)
                self._queue.append(batch)
            batch.members += 1
            batch.work = work
            while not batch.done and (self._busy or self._queue[0] is not batch):
                self._cond.wait()
            if batch.done:
                return self._outcome(batch)
            # This caller runs the rewrite for the whole batch, which closes now.
            self._queue.popleft()
            batch.open = False
            self._busy = True
            job = batch.work
        failure: BaseException | None = None
        try:
            batch.value = job()
        except Exception as exc:  # noqa: BLE001 - raised here and in every member's thread
            batch.error = failure = exc
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt etc.: re-raised here only
            batch.error = PluginError(f"the shared Kea rewrite was interrupted ({type(exc).__name__})")
            failure = exc
        finally:
            with self._cond:
                self._busy = False
                batch.done = True
                self.rewrites += 1
                self.callers += batch.members
                self._cond.notify_all()
        if failure is not None:
            raise failure
        return batch.value, batch.members  # type: ignore[return-value]

    @staticmethod
    def _outcome(batch: _Batch[T]) -> tuple[T, int]:
        if batch.error is not None:
            # Each caller raises its own copy: one exception object raised in
            # many threads would collect all their tracebacks.
            try:
                own = copy.copy(batch.error)
            except Exception:  # noqa: BLE001 - an exception that cannot be copied is raised as it is
                raise batch.error from None
            raise own from batch.error
        return batch.value, batch.members  # type: ignore[return-value]


_coordinators: dict[tuple[str, str], RewriteCoordinator] = {}
_lock = threading.Lock()


def coordinator_for(config: str, control_socket: str) -> RewriteCoordinator:
    """The process's coordinator for the Kea that reads ``config`` and listens on ``control_socket``."""
    key = (config, control_socket)
    with _lock:
        found = _coordinators.get(key)
        if found is None:
            found = _coordinators[key] = RewriteCoordinator(f"{config} ({control_socket})")
        return found
