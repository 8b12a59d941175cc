"""Bursts of changes on the real Kea 2.2 without a hosts database: one whole rewrite shared by many.

Each test runs the plugin's managed Kea in a namespace (the ``kea_server``
fixture) and counts ``config-set`` commands in Kea's own log
(``COMMAND_RECEIVED Received command 'config-set'``), not in a double.

To know for certain that changes arrive *while* a rewrite runs - on a loaded
two-core machine, threads may otherwise start one after another - the tests
pause Kea (SIGSTOP by its PID) while the first change's ``config-test`` waits
for its answer, wait until every other change is queued behind it
(``RewriteCoordinator.waiting()``), and resume Kea (SIGCONT). No assertion
depends on how fast anything is.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from dhcpdlab import Threads, error_events
from sqlmodel import select

import qrm_dhcpd.plugin
from qrm_core import db
from qrm_core.config import Settings
from qrm_core.errors import PluginError
from qrm_core.models import Event, Resource
from qrm_core.plugins import PluginSystem
from qrm_core.services import service_context
from qrm_core.services.resources import add_resource
from qrm_core.testkit import wait_until
from qrm_dhcpd.backends import ChangeReport, KeaBackend
from qrm_dhcpd.coalesce import RewriteCoordinator
from qrm_dhcpd.kea import KeaControl
from qrm_dhcpd.service import ManagedDhcpServer
from qrm_dhcpd.settings import load_settings

pytestmark = pytest.mark.netns

DEADLINE = 90.0
BURST = 40


@dataclass(frozen=True)
class Node:
    mac: str
    ip: str
    hostname: str
    id: int | None = None


def node(i: int, ip: str | None = None) -> Node:
    return Node(f"52:54:00:00:10:{i:02x}", ip or f"10.99.0.{10 + i}", f"burst{i}")


def insert(core: Settings, n: Node) -> Node:
    """The resource row, committed, as core leaves it before calling the hooks."""
    row = {"mac": n.mac, "ip": n.ip, "hostname": n.hostname, "kind": "physical", "state": "idle"}
    with db.get_engine(core).begin() as conn:
        key = conn.execute(sa.insert(Resource).values(capabilities=[], **row)).inserted_primary_key
    return Node(n.mac, n.ip, n.hostname, int(key[0]) if key is not None else None)


def backend(core: Settings, **kwargs: Any) -> KeaBackend:
    """A backend made per call, as the hooks make it."""
    return KeaBackend(load_settings(), core, **kwargs)


def upsert(core: Settings, n: Node) -> ChangeReport:
    return backend(core).upsert(mac=n.mac, ip=n.ip, hostname=n.hostname, resource_id=n.id)


def kea_commands(server: ManagedDhcpServer, command: str) -> int:
    """How many times Kea logged receiving ``command``."""
    text = server.backend.paths.log.read_text(errors="replace")
    return text.count(f"COMMAND_RECEIVED Received command '{command}'")


def reservations(config: dict[str, Any]) -> dict[str, dict[str, str]]:
    """MAC -> the reservation's address and hostname (Kea's config-get adds defaults; left out)."""
    (subnet,) = config["Dhcp4"]["subnet4"]
    keys = ("hw-address", "ip-address", "hostname")
    return {r["hw-address"]: {k: r[k] for k in keys if k in r} for r in subnet.get("reservations", [])}


def running_reservations(server: ManagedDhcpServer) -> dict[str, dict[str, str]]:
    answer = KeaControl(server.backend.paths.control_socket).command("config-get")
    return reservations(answer["arguments"])


def file_reservations(server: ManagedDhcpServer) -> dict[str, dict[str, str]]:
    return reservations(json.loads(server.backend.paths.config.read_text()))


@contextmanager
def kea_paused(server: ManagedDhcpServer) -> Iterator[None]:
    """Kea stopped (SIGSTOP to its PID) for the block; it resumes afterwards whatever happens."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def start_held_rewrite(threads: Threads, coordinator: RewriteCoordinator, call: Callable[[], Any]) -> None:
    """Start ``call`` (a change) and wait until its rewrite is under way (stuck on the paused Kea)."""
    threads.start("first", call)
    wait_until(lambda: coordinator.busy, "the first change's rewrite to start")


def test_a_single_change_is_one_rewrite_as_before(
    kea_server: ManagedDhcpServer, qrm_settings: Settings
) -> None:
    coordinator = backend(qrm_settings).coordinator
    sets, rewrites = kea_commands(kea_server, "config-set"), coordinator.rewrites

    a = insert(qrm_settings, node(1))
    report = upsert(qrm_settings, a)
    assert (report.mac, report.action, report.how, report.problems) == (a.mac, "reserved", "config-set", [])
    assert report.seconds > 0
    assert running_reservations(kea_server)[a.mac] == {
        "hw-address": a.mac,
        "ip-address": a.ip,
        "hostname": a.hostname,
    }
    assert a.mac in file_reservations(kea_server)

    # an address clash is reported to the change that has it
    b = insert(qrm_settings, node(2, ip=a.ip))
    report = upsert(qrm_settings, b)
    assert report.how == "config-set"
    assert [(p.mac, "already reserved" in p.message) for p in report.problems] == [(b.mac, True)]
    assert "ip-address" not in running_reservations(kea_server)[b.mac]

    with db.get_engine(qrm_settings).begin() as conn:
        conn.execute(sa.delete(Resource).where(Resource.mac == a.mac))
    report = backend(qrm_settings).remove(a.mac)
    assert (report.action, report.how) == ("released", "config-set")
    assert a.mac not in running_reservations(kea_server)
    assert a.mac not in file_reservations(kea_server)

    assert kea_commands(kea_server, "config-set") - sets == 3
    assert coordinator.rewrites - rewrites == 3


def test_a_burst_shares_one_rewrite(
    kea_server: ManagedDhcpServer, qrm_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """41 changes: the first one's rewrite, then ONE rewrite for the 40 that arrived meanwhile."""
    monkeypatch.setenv("QRM_DHCPD_TIMEOUT", str(DEADLINE))  # Kea is paused while the burst queues up
    coordinator = backend(qrm_settings).coordinator
    sets, rewrites = kea_commands(kea_server, "config-set"), coordinator.rewrites
    first = insert(qrm_settings, node(0))
    threads = Threads(DEADLINE)
    barrier = threading.Barrier(BURST)
    nodes = [node(i) for i in range(1, BURST + 1)]
    # one of the burst claims the first one's address: only it is told so
    nodes[4] = node(5, ip=first.ip)

    def register(n: Node) -> ChangeReport:
        barrier.wait(DEADLINE)
        return upsert(qrm_settings, insert(qrm_settings, n))

    with kea_paused(kea_server):
        start_held_rewrite(threads, coordinator, lambda: upsert(qrm_settings, first))
        for n in nodes:
            threads.start(n.mac, lambda n=n: register(n))  # type: ignore[misc]
        wait_until(lambda: coordinator.waiting() == BURST, f"{BURST} changes queued behind the first")
        assert kea_commands(kea_server, "config-set") == sets  # nothing got through the paused Kea
    threads.join()

    assert threads.errors == {}
    assert threads.answers["first"].how == "config-set"
    for n in nodes:
        report = threads.answers[n.mac]
        assert (report.mac, report.action) == (n.mac, "reserved")
        assert report.how == f"config-set (shared by {BURST} changes)"
        assert report.problems == [] or (n.mac == nodes[4].mac and len(report.problems) == 1)
    assert "already reserved" in threads.answers[nodes[4].mac].problems[0].message

    assert kea_commands(kea_server, "config-set") - sets == 2
    assert coordinator.rewrites - rewrites == 2
    live, saved = running_reservations(kea_server), file_reservations(kea_server)
    for n in [first, *nodes]:
        assert live[n.mac]["hostname"] == n.hostname
        assert saved[n.mac] == live[n.mac]
        if n is not nodes[4]:
            assert live[n.mac]["ip-address"] == n.ip
    assert "ip-address" not in live[nodes[4].mac]
    assert kea_server.process is not None and kea_server.process.poll() is None


def test_changes_at_once_never_leave_a_reservation_out(
    kea_server: ManagedDhcpServer, qrm_settings: Settings
) -> None:
    """Real thread timing, nothing paused: each thread commits its row, then changes, all at once.

    Before group commit, rewrites overlapped: one that read the database before
    another thread's commit could ``config-set`` after that thread's rewrite,
    and the reservation was missing from the running Kea: with the previous
    change path patched back in, this test failed in 9 runs out of 9 here.
    However the changes group now, none may be missing.
    """
    coordinator = backend(qrm_settings).coordinator
    sets, rewrites = kea_commands(kea_server, "config-set"), coordinator.rewrites
    barrier = threading.Barrier(BURST)
    threads = Threads(DEADLINE)
    nodes = [node(i) for i in range(BURST)]

    def register(n: Node) -> ChangeReport:
        barrier.wait(DEADLINE)
        return upsert(qrm_settings, insert(qrm_settings, n))

    for n in nodes:
        threads.start(n.mac, lambda n=n: register(n))  # type: ignore[misc]
    threads.join()
    assert threads.errors == {}
    live, saved = running_reservations(kea_server), file_reservations(kea_server)
    assert {n.mac for n in nodes} <= set(live)
    assert saved == live
    done = kea_commands(kea_server, "config-set") - sets
    assert done == coordinator.rewrites - rewrites <= BURST
    shared = sum(1 for report in threads.answers.values() if "(shared by" in report.how)
    assert (shared > 0) == (done < BURST)


def test_a_rejected_shared_rewrite_fails_every_change_it_covered(
    kea_server: ManagedDhcpServer,
    qrm_settings: Settings,
    qrm_ctx,  # type: ignore[no-untyped-def]
    qrm_plugins: PluginSystem,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the hooks: each registration covered by the failed rewrite records its own error event."""
    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    monkeypatch.setenv("QRM_DHCPD_TIMEOUT", str(DEADLINE))
    coordinator = backend(qrm_settings).coordinator
    sets, tests_ = kea_commands(kea_server, "config-set"), kea_commands(kea_server, "config-test")
    first = insert(qrm_settings, node(0))
    good = backend(qrm_settings)
    threads = Threads(DEADLINE)
    count = 8

    def register(n: Node) -> None:
        with service_context(qrm_settings, actor="tester", plugins=qrm_plugins) as ctx:
            add_resource(ctx, mac=n.mac, ip=n.ip, hostname=n.hostname)

    with kea_paused(kea_server):
        start_held_rewrite(
            threads,
            coordinator,
            lambda: good.upsert(mac=first.mac, ip=first.ip, hostname=first.hostname, resource_id=first.id),
        )
        # the changes that follow are rendered with an interface Kea does not have: it rejects them
        monkeypatch.setenv("QRM_DHCPD_INTERFACE", "qrmnosuch0")
        for i in range(1, count + 1):
            threads.start(f"n{i}", lambda i=i: register(node(i)))  # type: ignore[misc]
        wait_until(lambda: coordinator.waiting() == count, f"{count} registrations queued")
    threads.join()

    assert threads.errors == {}  # the registrations themselves succeeded
    assert threads.answers["first"].how == "config-set"
    events = error_events(qrm_ctx)
    assert len(events) == count
    for i in range(1, count + 1):
        (mine,) = [e for e in events if f"reservation of burst{i}:" in e]
        assert mine.startswith("DHCP kea: could not reserve")
        assert "Kea rejected the configuration (config-test), nothing changed" in mine
        assert "qrmnosuch0" in mine
    assert kea_commands(kea_server, "config-test") - tests_ == 2
    assert kea_commands(kea_server, "config-set") - sets == 1  # the first change only
    live = running_reservations(kea_server)
    assert set(live) == {first.mac}  # nothing of the rejected rewrite reached Kea
    assert set(file_reservations(kea_server)) == {first.mac}

    # `qrm dhcpd sync` with the right settings brings Kea in step again
    monkeypatch.setenv("QRM_DHCPD_INTERFACE", kea_server.settings.interface or "")
    backend(qrm_settings).full_sync()
    assert len(running_reservations(kea_server)) == count + 1
    qrm_ctx.session.expire_all()
    assert len(qrm_ctx.session.exec(select(Event).where(Event.level == "error")).all()) == count


def test_kea_down_a_burst_shares_one_file_rewrite(
    kea_server: ManagedDhcpServer, qrm_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KeaUnreachable: the fallback (checked file rewrite) goes through the same coordinator."""
    kea_server.stop()
    coordinator = backend(qrm_settings).coordinator
    rewrites = coordinator.rewrites
    threads = Threads(DEADLINE)
    release = threading.Event()
    # Kea cannot be paused here, so a rewrite is held open through the coordinator itself
    threads.start("held", lambda: coordinator.run(lambda: release.wait(DEADLINE), share=False))
    wait_until(lambda: coordinator.busy, "the held rewrite")
    nodes = [insert(qrm_settings, node(i)) for i in range(1, 21)]
    for n in nodes:
        threads.start(n.mac, lambda n=n: upsert(qrm_settings, n))  # type: ignore[misc]
    wait_until(lambda: coordinator.waiting() == len(nodes), "the changes to queue")
    release.set()
    threads.join()
    assert threads.errors == {}
    for n in nodes:
        assert threads.answers[n.mac].how == (
            f"Kea is not running: configuration file rewritten (shared by {len(nodes)} changes)"
        )
    assert coordinator.rewrites - rewrites == 2
    assert set(file_reservations(kea_server)) == {n.mac for n in nodes}

    # a shared fallback that fails (the check rejects the file) fails every change it covered
    before = kea_server.backend.paths.config.read_text()
    monkeypatch.setenv("QRM_DHCPD_KEA_DHCP4", "/bin/false")
    release = threading.Event()
    threads = Threads(DEADLINE)
    threads.start("held", lambda: coordinator.run(lambda: release.wait(DEADLINE), share=False))
    wait_until(lambda: coordinator.busy, "the held rewrite")
    more = [insert(qrm_settings, node(i)) for i in range(21, 31)]
    for n in more:
        threads.start(n.mac, lambda n=n: upsert(qrm_settings, n))  # type: ignore[misc]
    wait_until(lambda: coordinator.waiting() == len(more), "the changes to queue")
    release.set()
    threads.join()
    assert sorted(threads.errors) == sorted(n.mac for n in more)
    for error in threads.errors.values():
        assert isinstance(error, PluginError)
        assert error.message.startswith("kea-dhcp4 -t rejected the generated configuration, nothing changed")
    assert kea_server.backend.paths.config.read_text() == before

    # and the next start serves what the database says
    monkeypatch.delenv("QRM_DHCPD_KEA_DHCP4")
    kea_server.start()
    assert set(running_reservations(kea_server)) == {n.mac for n in [*nodes, *more]}
