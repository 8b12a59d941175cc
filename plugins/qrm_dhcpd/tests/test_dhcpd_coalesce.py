"""The group-commit coordinator on its own (no Kea; test_dhcpd_kea_burst.py drives the real one).

Timing never decides an assertion here: a test that needs a rewrite to be
running while others arrive holds one open with an event, waits until the
others are queued (``waiting()``), and only then lets it finish.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from dhcpdlab import Threads

from qrm_core.errors import PluginError
from qrm_core.testkit import wait_until
from qrm_dhcpd.coalesce import RewriteCoordinator, coordinator_for

DEADLINE = 60.0


def hold(coordinator: RewriteCoordinator, callers: Threads) -> threading.Event:
    """Start a rewrite that runs until the returned event is set."""
    release = threading.Event()
    callers.start(-1, lambda: coordinator.run(lambda: release.wait(DEADLINE), share=False))
    wait_until(lambda: coordinator.busy, "the held rewrite to start")
    return release


def test_changes_during_a_rewrite_share_the_next_one() -> None:
    coordinator = RewriteCoordinator("test")
    callers = Threads(DEADLINE)
    release = hold(coordinator, callers)
    runs = itertools.count()
    for i in range(25):
        callers.start(i, lambda: coordinator.run(lambda: f"rewrite {next(runs)}"))
    wait_until(lambda: coordinator.waiting() == 25, "25 queued changes")
    assert coordinator.rewrites == 0
    release.set()
    callers.join()
    assert callers.errors == {}
    assert {callers.answers[i] for i in range(25)} == {("rewrite 0", 25)}
    assert (coordinator.rewrites, coordinator.callers) == (2, 26)
    assert not coordinator.busy and coordinator.waiting() == 0


def test_a_caller_is_served_by_a_rewrite_that_started_after_its_call() -> None:
    """Unheld, with real thread timing: whatever the grouping, nobody gets an older rewrite."""
    coordinator = RewriteCoordinator("test")
    clock = itertools.count()
    begun: dict[int, int] = {}

    def rewrite() -> int:
        started = next(clock)
        time.sleep(0.002)
        return started

    def change(i: int) -> tuple[int, int]:
        begun[i] = next(clock)
        return coordinator.run(rewrite)

    callers = Threads(DEADLINE)
    barrier = threading.Barrier(40)
    for i in range(40):
        callers.start(i, lambda i=i: (barrier.wait(DEADLINE), change(i))[1])  # type: ignore[misc]
    callers.join()
    assert callers.errors == {}
    for i, (started, _shared) in callers.answers.items():
        assert started > begun[i], (i, started, begun[i])
    assert sum(1 / shared for _, shared in callers.answers.values()) == pytest.approx(coordinator.rewrites)
    assert coordinator.callers == 40


def test_the_error_of_a_shared_rewrite_reaches_every_caller() -> None:
    coordinator = RewriteCoordinator("test")
    callers = Threads(DEADLINE)
    release = hold(coordinator, callers)

    def failing() -> None:
        raise PluginError("Kea rejected the configuration (config-test), nothing changed: boom")

    for i in range(10):
        callers.start(i, lambda: coordinator.run(failing))
    wait_until(lambda: coordinator.waiting() == 10, "10 queued changes")
    release.set()
    callers.join()
    assert sorted(callers.errors) == list(range(10))
    errors = list(callers.errors.values())
    assert all(isinstance(e, PluginError) and e.message.endswith("boom") for e in errors)
    assert len({id(e) for e in errors}) == 10  # each caller raised its own copy
    # the coordinator is not stuck after a failure
    assert coordinator.run(lambda: "ok") == ("ok", 1)


def test_without_sharing_every_caller_gets_its_own_rewrite_in_turn() -> None:
    coordinator = RewriteCoordinator("test")
    callers = Threads(DEADLINE)
    release = hold(coordinator, callers)
    active = []

    def rewrite() -> str:
        active.append(1)
        assert len(active) == 1, "two rewrites overlapped"
        time.sleep(0.001)
        active.pop()
        return "done"

    for i in range(8):
        callers.start(i, lambda: coordinator.run(rewrite, share=False))
    wait_until(lambda: coordinator.waiting() == 8, "8 queued changes")
    release.set()
    callers.join()
    assert callers.errors == {}
    assert all(callers.answers[i] == ("done", 1) for i in range(8))
    assert coordinator.rewrites == 9


def test_one_coordinator_per_kea() -> None:
    a = coordinator_for("/tmp/x/kea-dhcp4.conf", "/tmp/x/kea4.sock")
    assert coordinator_for("/tmp/x/kea-dhcp4.conf", "/tmp/x/kea4.sock") is a
    assert coordinator_for("/tmp/y/kea-dhcp4.conf", "/tmp/y/kea4.sock") is not a
