"""The reservation writer's rules (qrm_dhcpd.writer), with a recording apply function.

What the writer promises, whatever the backend: a hook queues and returns
while the writer runs; the last change of a MAC wins within a round and two
changes of one MAC are never applied out of order; stop applies what is
queued, after which hooks write at once again; start after stop works. The
backends behind it are tested for real in test_dhcpd_kea_hosts_db.py
(PostgreSQL/MariaDB) and by the live Kea/ISC tests.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, cast

import pytest

from qrm_core.context import HookContext
from qrm_dhcpd import writer as writer_mod
from qrm_dhcpd.writer import ReservationWriter


@dataclass
class R:
    """The fields of ResourcePublic the writer reads."""

    mac: str
    ip: str | None = None


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, ctx, action, resource) -> None:  # type: ignore[no-untyped-def]
        self.entered.set()
        assert self.gate.wait(30)
        with self.lock:
            self.calls.append((action, resource.mac, resource.ip))


@pytest.fixture
def ctx() -> HookContext:
    return HookContext(settings=cast(Any, None), actor="test")  # the writer hands it on, unread


@pytest.fixture
def running():  # type: ignore[no-untyped-def]
    made: list[ReservationWriter] = []

    def start(apply: Recorder) -> ReservationWriter:
        w = ReservationWriter(apply)
        w.start()
        made.append(w)
        return w

    yield start
    for w in made:
        w.stop()
    assert writer_mod.current() is None


def test_without_a_running_writer_nothing_is_queued(ctx: HookContext) -> None:
    assert writer_mod.current() is None
    assert writer_mod.submit(ctx, "reserve", R("52:54:00:00:00:01")) is False


def test_a_hook_queues_and_returns_while_a_round_is_blocked(ctx: HookContext, running) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    w = running(rec)
    rec.gate.clear()  # the backend hangs (a locked table, a slow Kea)
    assert writer_mod.submit(ctx, "reserve", R("52:54:00:00:00:01", "10.0.0.1"))
    assert rec.entered.wait(10)
    # while the first change is stuck in the backend, the next ones still return at once
    for i in range(2, 50):
        assert writer_mod.submit(ctx, "reserve", R(f"52:54:00:00:00:{i:02x}", f"10.0.0.{i}"))
    assert w.pending() >= 49
    assert rec.calls == []
    rec.gate.set()
    assert w.flush(30)
    assert sorted(mac for _, mac, _ in rec.calls) == sorted(f"52:54:00:00:00:{i:02x}" for i in range(1, 50))
    # the 48 queued meanwhile went in one round, not one each
    assert w.rounds == 2 and w.applied == 49


def test_the_last_change_of_a_mac_wins_and_order_is_kept(ctx: HookContext, running) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    w = running(rec)
    rec.gate.clear()
    mac = "52:54:00:00:00:aa"
    writer_mod.submit(ctx, "reserve", R("52:54:00:00:00:01"))  # occupies the writer
    assert rec.entered.wait(10)
    writer_mod.submit(ctx, "reserve", R(mac, "10.0.0.1"))
    writer_mod.submit(ctx, "update", R(mac, "10.0.0.2"))
    writer_mod.submit(ctx, "remove", R(mac))
    writer_mod.submit(ctx, "reserve", R(mac, "10.0.0.3"))
    rec.gate.set()
    assert w.flush(30)
    assert [c for c in rec.calls if c[1] == mac] == [("reserve", mac, "10.0.0.3")]
    # a change made after a round started is applied after that round's change of the MAC
    rec.gate.clear()
    rec.entered.clear()
    writer_mod.submit(ctx, "reserve", R(mac, "10.0.0.4"))
    assert rec.entered.wait(10)
    writer_mod.submit(ctx, "remove", R(mac))
    rec.gate.set()
    assert w.flush(30)
    assert [c[0] for c in rec.calls if c[1] == mac][-2:] == ["reserve", "remove"]


def test_stop_applies_what_is_queued_then_hooks_write_at_once(ctx: HookContext, running) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    w = running(rec)
    rec.gate.clear()
    for i in range(1, 21):
        writer_mod.submit(ctx, "reserve", R(f"52:54:00:00:01:{i:02x}"))
    stopper = threading.Thread(target=w.stop)
    stopper.start()
    rec.gate.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert len(rec.calls) == 20
    assert writer_mod.current() is None
    assert writer_mod.submit(ctx, "reserve", R("52:54:00:00:02:01")) is False
    # a server becoming leader again, or restarted services: start after stop works
    w.start()
    assert writer_mod.submit(ctx, "reserve", R("52:54:00:00:02:02"))
    assert w.flush(30)
    assert rec.calls[-1][1] == "52:54:00:00:02:02"


def test_a_failing_round_does_not_stop_the_writer(ctx: HookContext, running) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []

    def apply(_ctx, _action, resource) -> None:  # type: ignore[no-untyped-def]
        seen.append(resource.mac)
        if resource.mac.endswith("01"):
            raise RuntimeError("a bug in a backend")

    w = running(apply)
    writer_mod.submit(ctx, "reserve", R("52:54:00:00:00:01"))
    assert w.flush(30)
    writer_mod.submit(ctx, "reserve", R("52:54:00:00:00:02"))
    assert w.flush(30)
    assert seen == ["52:54:00:00:00:01", "52:54:00:00:00:02"]


def test_a_round_goes_to_apply_many_first_and_apply_gets_what_it_leaves(ctx: HookContext, running) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    rounds: list[list[str]] = []

    def apply_many(changes):  # type: ignore[no-untyped-def]
        rounds.append([r.mac for _, _, r in changes])
        return [c for c in changes if c[1] == "remove"]  # writes the rest itself

    w = ReservationWriter(rec, apply_many)
    w.start()
    try:
        rec.gate.clear()
        writer_mod.submit(ctx, "reserve", R("52:54:00:00:00:01"))  # a round of one: apply alone
        assert rec.entered.wait(10)
        for i in range(2, 7):
            writer_mod.submit(ctx, "reserve", R(f"52:54:00:00:00:{i:02x}"))
        writer_mod.submit(ctx, "remove", R("52:54:00:00:00:99"))
        rec.gate.set()
        assert w.flush(30)
    finally:
        w.stop()
    assert rounds == [[f"52:54:00:00:00:{i:02x}" for i in range(2, 7)] + ["52:54:00:00:00:99"]]
    assert rec.calls == [("reserve", "52:54:00:00:00:01", None), ("remove", "52:54:00:00:00:99", None)]
