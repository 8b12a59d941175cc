"""libvirt's event loop thread delivers lifecycle events, and interpret() says what each
means for a partition (the test driver emits the same events as QEMU for these)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from qrm_libvirt.connections import ConnectionPool
from qrm_libvirt.events import Lifecycle, domain_state, event_loop_running, interpret
from qrm_libvirt.testing import test_host, wait_until


def test_lifecycle_events_arrive_and_mean_states(libvirt, tmp_path: Path) -> None:
    pool = ConnectionPool()
    host = test_host(tmp_path)
    seen: list[tuple[str, Lifecycle | None]] = []
    lock = threading.Lock()

    def callback(_conn, dom, event, detail, _opaque):
        with lock:
            seen.append((dom.name(), interpret(event, detail)))

    try:
        conn = pool.get(host.uri, "hv1")
        assert event_loop_running()
        callback_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, callback, None)
        dom = conn.defineXML(
            "<domain type='kvm'><name>ev1</name><memory>65536</memory><os><type>hvm</type></os></domain>"
        )
        dom.create()
        dom.suspend()
        dom.resume()
        dom.destroy()
        dom.undefine()
        expected = [
            ("ev1", None),  # defined: no state change
            ("ev1", Lifecycle("running", "booted")),
            ("ev1", Lifecycle("paused", "paused")),
            ("ev1", Lifecycle("running", "resumed")),
            ("ev1", Lifecycle("stopped", "destroyed")),
            ("ev1", Lifecycle("undefined", "undefined")),
        ]
        wait_until(lambda: len(seen) >= len(expected), 5, "six lifecycle events")
        assert seen == expected
        conn.domainEventDeregisterAny(callback_id)
    finally:
        pool.close_all()


@pytest.mark.parametrize(
    ("event", "detail", "meaning"),
    [
        ("VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED", None),
        ("VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_MIGRATED", None),
        ("VIR_DOMAIN_EVENT_STARTED", "VIR_DOMAIN_EVENT_STARTED_MIGRATED", Lifecycle("running", "migrated")),
        ("VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_CRASHED", Lifecycle("stopped", "crashed")),
        ("VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN", Lifecycle("stopped", "shut down")),
        ("VIR_DOMAIN_EVENT_SHUTDOWN", "VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED", None),
    ],
)
def test_migration_steps_are_no_state_change(
    libvirt, event: str, detail: str, meaning: Lifecycle | None
) -> None:
    assert interpret(getattr(libvirt, event), getattr(libvirt, detail)) == meaning


def test_domain_states(libvirt) -> None:
    assert domain_state(libvirt.VIR_DOMAIN_RUNNING) == "running"
    assert domain_state(libvirt.VIR_DOMAIN_PAUSED) == "paused"
    assert domain_state(libvirt.VIR_DOMAIN_SHUTOFF) == "stopped"
    assert domain_state(libvirt.VIR_DOMAIN_CRASHED) == "stopped"
