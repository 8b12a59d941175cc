"""``qrm ve reset`` of a running VE in one boot (issue 12): its machines stay the VE's,
reboot, and hold their boot in the initrd (the registration's ``hold``) until the image
is reverted; nothing mounts the image before that, the old OS is down before the revert,
and a revert that fails or a machine that never comes back ends in a clear stopped VE.

The machines follow the agent protocol through the services (tests/core/enginekit.py);
``initrd_boot`` is what the agent in the boot image does before it mounts a VE's root."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from enginekit import Node, Site
from sqlmodel import select

from qrm_core.errors import DriverError
from qrm_core.models import Event, EventLevel, Resource, VirtualEnvironment
from qrm_core.services import agent, boot, boot_images, images, service_context, storage
from qrm_core.services import virtual_environments as ves

MACS = ("52:54:00:00:12:01", "52:54:00:00:12:02")


@pytest.fixture
def site(qrm_ctx: Any, qrm_settings: Any, qrm_plugins: Any) -> Site:
    storage.add_storage(qrm_ctx, name="st", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="web", storage="st", size_mb=100)
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")
    # Two machines in one VE: a shared pool of two.
    ves.create_ve(
        qrm_ctx,
        name="team",
        boot_image="idle",
        fs_image="web",
        pristine=True,
        deployment="shared",
        pool_size=2,
    )
    s = Site(qrm_settings, qrm_plugins)
    for mac in MACS:
        s.add_node(mac)
    ves.start_ve(qrm_ctx, "team")
    s.settle(6)
    assert _ve_row(s).state == "running"
    return s


def _ve_row(s: Site) -> VirtualEnvironment:
    with service_context(s.settings, plugins=s.plugins) as ctx:
        row = ves.get_ve_row(ctx, "team")
        ctx.session.expunge(row)
        return row


def _members(s: Site) -> dict[str, Resource]:
    with service_context(s.settings, plugins=s.plugins) as ctx:
        rows = ctx.session.exec(select(Resource).order_by(Resource.mac)).all()
        for row in rows:
            ctx.session.expunge(row)
    return {row.mac: row for row in rows}


def _boot_mode(s: Site, mac: str) -> str:
    with service_context(s.settings, plugins=s.plugins) as ctx:
        return boot.boot_config(ctx, mac).mode


def _messages(s: Site, since: int = 0, level: str | None = None) -> list[str]:
    with service_context(s.settings, plugins=s.plugins) as ctx:
        query = select(Event).where(Event.id > since).order_by(Event.id)
        if level is not None:
            query = query.where(Event.level == level)
        return [e.message for e in ctx.session.exec(query).all()]


def _last_event_id(s: Site) -> int:
    with service_context(s.settings, plugins=s.plugins) as ctx:
        return max(e.id or 0 for e in ctx.session.exec(select(Event)).all())


def initrd_boot(s: Site, node: Node) -> agent.Registration:
    """The machine reboots (PXE: its boot configuration) and its agent registers from the
    initrd, before mounting the root, as the boot image's agent does (wait_for_revert)."""
    with service_context(s.settings, plugins=s.plugins) as ctx:
        config = boot.boot_config(ctx, node.mac)
    assert config.mode == "ve", f"{node.mac} boots {config.mode}, not into the VE"
    node.generation, node.mode, node.ve = config.boot_generation, "ve", config.ve
    return register(s, node, "initrd")


def register(s: Site, node: Node, stage: str | None) -> agent.Registration:
    with service_context(s.settings, plugins=s.plugins) as ctx:
        reg = agent.register(
            ctx,
            mac=node.mac,
            ip=node.ip,
            cpus=node.cpus,
            memory_mb=node.memory_mb,
            boot_generation=node.generation,
            mode="ve",
            ve=node.ve,
            now=s.clock(),
            proof=node.token,
            stage=stage,
        )
    node.resource_id, node.token = reg.resource_id, reg.token
    return reg


def old_os_hears_reboot(s: Site, node: Node) -> None:
    """The VE's old OS heartbeats (its boot generation is behind now) and is told to reboot."""
    with service_context(s.settings, plugins=s.plugins) as ctx:
        answer = agent.heartbeat(
            ctx,
            resource_id=node.resource_id,
            token=node.token,
            state="active",
            boot_generation=node.generation,
            now=s.clock(),
        )
    assert answer.command == "reboot"


@contextmanager
def reset_in_thread(s: Site, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """``reset_ve`` runs as the server runs it (its own thread and service context)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with service_context(s.settings, actor="tester", plugins=s.plugins) as ctx:
                outcome["result"] = images.reset_ve(ctx, "team", poll=0.02, **kwargs)
        except Exception as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield outcome
    finally:
        thread.join(30)
        assert not thread.is_alive()


def wait_for(what: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def spy_revert(monkeypatch: Any, s: Site, fail: str | None = None) -> list[dict[str, Any]]:
    """Each revert, with what the machines were doing while it ran."""
    from qrm_core.drivers.fake import FakeStorage

    real = FakeStorage.revert_volume
    calls: list[dict[str, Any]] = []

    def revert(self: Any, *args: Any, **kwargs: Any) -> str:
        calls.append(
            {
                "members": _members(s),
                "boot_modes": {mac: _boot_mode(s, mac) for mac in MACS},
                "phase": _ve_row(s).reset_phase,
                "problem": _ve_row(s).problem,
            }
        )
        if fail:
            raise DriverError(fail)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FakeStorage, "revert_volume", revert)
    return calls


def test_a_reset_boots_the_machines_straight_into_the_reverted_image(site: Site, monkeypatch: Any) -> None:
    s = site
    calls = spy_revert(monkeypatch, s)
    nodes = [s.nodes[mac] for mac in MACS]
    since = _last_event_id(s)
    with reset_in_thread(s) as outcome:
        wait_for(lambda: _ve_row(s).reset_phase == "rebooting")
        ve = _ve_row(s)
        assert ve.state == "starting" and ve.problem.startswith(
            "resetting: waiting for its machines to reboot"
        )
        # The machines stay the VE's and are told to boot into it again, not into idle.
        members = _members(s)
        assert all(m.ve_id == ve.id and m.state == "booting" for m in members.values())
        assert all(_boot_mode(s, mac) == "ve" for mac in MACS)
        # The first machine is down and held; the other still runs the old image: no revert.
        old_os_hears_reboot(s, nodes[0])
        first = initrd_boot(s, nodes[0])
        assert first.hold == "virtual environment team is resetting: waiting for its machines to reboot"
        time.sleep(0.3)
        assert not calls
        assert "(1 of 2 down)" in _ve_row(s).problem
        again = register(s, nodes[0], "initrd")  # the agent asks again a second later: held still
        assert again.hold and not calls
        # The second machine is down: the image is reverted, both held meanwhile.
        old_os_hears_reboot(s, nodes[1])
        second = initrd_boot(s, nodes[1])
        assert second.hold
        wait_for(lambda: "result" in outcome or "error" in outcome)
    assert "error" not in outcome, outcome.get("error")
    assert len(calls) == 1
    during = calls[0]
    assert during["phase"] == "reverting" and during["problem"] == "resetting: reverting its image"
    # While reverting: both machines registered in the boot they were ordered (their
    # old OS down), none mounted (a boot asked for now is held by its boot script).
    assert all(m.booted_generation == m.boot_generation for m in during["members"].values())
    assert during["boot_modes"] == {mac: "none" for mac in MACS}
    # Reverted: the hold is lifted; the agents mount, switch into the VE, go active.
    for node in nodes:
        assert register(s, node, "initrd").hold == ""
        assert register(s, node, "ve").hold == ""
    s.settle(3)
    ve = _ve_row(s)
    assert ve.state == "running" and ve.problem == "" and ve.reset_phase == ""
    messages = _messages(s, since)
    assert not [m for m in messages if "-> idle" in m or "released" in m], messages
    assert any("reset: web reverted to its first start" in m and "boot on" in m for m in messages)


def test_a_revert_that_fails_stops_the_ve_and_says_why(site: Site, monkeypatch: Any) -> None:
    s = site
    calls = spy_revert(monkeypatch, s, fail="no space left on the export")
    nodes = [s.nodes[mac] for mac in MACS]
    with reset_in_thread(s) as outcome:
        wait_for(lambda: _ve_row(s).reset_phase == "rebooting")
        for node in nodes:
            old_os_hears_reboot(s, node)
            assert initrd_boot(s, node).hold
        wait_for(lambda: "result" in outcome or "error" in outcome)
    assert len(calls) == 1
    error = outcome["error"]
    assert isinstance(error, DriverError)
    assert str(error) == "reset of team failed: reverting web failed: no space left on the export"
    ve = _ve_row(s)
    assert ve.desired_state == "stopped" and ve.reset_phase == ""
    assert ve.problem.startswith("reset failed: reverting web failed: no space left on the export")
    errors = _messages(s, level=EventLevel.ERROR.value)
    assert any(m.startswith("reset of virtual environment team failed: reverting web failed") for m in errors)
    # The held agents hear that another boot was ordered (the answer's generation): they
    # reboot, into idle, and are released; the VE ends stopped, its problem kept.
    for node in nodes:
        reg = register(s, node, "initrd")
        assert reg.hold == "" and reg.boot_generation != node.generation
        assert _boot_mode(s, node.mac) == "idle"
        node.boot(s.settings, s.plugins, s.clock)
    s.settle(2)
    ve = _ve_row(s)
    assert ve.state == "stopped" and ve.problem.startswith("reset failed: ")
    assert all(m.ve_id is None and m.state == "idle" for m in _members(s).values())


def test_a_machine_that_never_comes_back_ends_the_reset_with_one_line(site: Site, monkeypatch: Any) -> None:
    s = site
    calls = spy_revert(monkeypatch, s)
    nodes = [s.nodes[mac] for mac in MACS]
    with reset_in_thread(s, timeout=1.0) as outcome:
        wait_for(lambda: _ve_row(s).reset_phase == "rebooting")
        old_os_hears_reboot(s, nodes[0])
        assert initrd_boot(s, nodes[0]).hold  # the other one never comes back
        wait_for(lambda: "result" in outcome or "error" in outcome)
    assert not calls  # nothing reverted
    label = _members(s)[MACS[1]].hostname or MACS[1]
    assert str(outcome["error"]) == (
        f"reset of team failed: {label} did not reboot within 1 s; nothing was reverted"
    )
    ve = _ve_row(s)
    assert ve.desired_state == "stopped" and "did not reboot within 1 s" in ve.problem


def test_an_agent_that_mounts_before_registering_is_rebooted_not_counted(
    site: Site, monkeypatch: Any
) -> None:
    """A boot image built before the hold: its agent registers only from the VE, after it
    mounted the image. It must not count as held: it is rebooted, and nothing reverted."""
    s = site
    calls = spy_revert(monkeypatch, s)
    node = s.nodes[MACS[0]]
    with reset_in_thread(s, timeout=1.0) as outcome:
        wait_for(lambda: _ve_row(s).reset_phase == "rebooting")
        old_os_hears_reboot(s, node)
        with service_context(s.settings, plugins=s.plugins) as ctx:
            node.generation = boot.boot_config(ctx, node.mac).boot_generation
        before = node.generation
        assert register(s, node, None).hold == ""
        assert _members(s)[node.mac].boot_generation == before + 1  # told to boot again
        wait_for(lambda: "result" in outcome or "error" in outcome)
    assert not calls
    assert any("its boot image's agent does not hold" in m for m in _messages(s))


def test_a_stop_during_the_reset_interrupts_it_and_reverts_nothing(site: Site, monkeypatch: Any) -> None:
    s = site
    calls = spy_revert(monkeypatch, s)
    with reset_in_thread(s) as outcome:
        wait_for(lambda: _ve_row(s).reset_phase == "rebooting")
        with service_context(s.settings, plugins=s.plugins) as ctx:
            ves.stop_ve(ctx, "team")
        wait_for(lambda: "result" in outcome or "error" in outcome)
    assert not calls
    assert "interrupted: it was stopped meanwhile; nothing was reverted" in str(outcome["error"])
    assert _ve_row(s).reset_phase == ""


def test_a_machine_the_engine_gives_up_on_ends_the_reset_at_once(site: Site, monkeypatch: Any) -> None:
    """The engine puts a machine that does not come back from its reboot in error after the
    boot timeout (60 s on this site's clock): the reset does not wait out its own timeout."""
    s = site
    calls = spy_revert(monkeypatch, s)
    nodes = [s.nodes[mac] for mac in MACS]
    with reset_in_thread(s) as outcome:
        wait_for(lambda: _ve_row(s).reset_phase == "rebooting")
        old_os_hears_reboot(s, nodes[0])
        s.clock.advance(30)
        assert initrd_boot(s, nodes[0]).hold
        s.clock.advance(61)  # the second machine never registers
        register(s, nodes[0], "initrd")  # the first is held, and asks again
        s.reconciler.tick()
        wait_for(lambda: "result" in outcome or "error" in outcome)
    assert not calls
    label = _members(s)[MACS[1]].hostname or MACS[1]
    assert str(outcome["error"]) == (
        f"reset of team failed: {label} did not come back from the reboot (boot timeout 60 s); "
        "nothing was reverted"
    )


def test_two_resets_at_once_revert_once(site: Site, monkeypatch: Any) -> None:
    """A second ``qrm ve reset`` of a VE being reset goes on with it (as after a server
    restart) but never reverts a second time under machines already booting on."""
    s = site
    calls = spy_revert(monkeypatch, s)
    nodes = [s.nodes[mac] for mac in MACS]
    with reset_in_thread(s) as first:
        wait_for(lambda: _ve_row(s).reset_phase == "rebooting")
        with reset_in_thread(s) as second:
            for node in nodes:
                old_os_hears_reboot(s, node)
                assert initrd_boot(s, node).hold
            wait_for(lambda: len(first) + len(second) == 2)
    assert len(calls) == 1
    outcomes = sorted((first | {"who": 1}, second | {"who": 2}), key=lambda o: "error" in o)
    assert "result" in outcomes[0]
    assert "another request of the same reset reverts its image" in str(outcomes[1]["error"])
    assert _ve_row(s).reset_phase == ""
