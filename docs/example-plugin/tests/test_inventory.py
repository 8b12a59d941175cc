"""The inventory follows resource events; hooks run through the real pluggy manager."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlmodel import select

import qrm_example.plugin
from qrm_core.errors import PluginError
from qrm_core.models import Event
from qrm_core.services import boot, boot_images, resources
from qrm_example import inventory

MAC = "52:54:00:00:10:01"


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each test starts as a fresh process would: no kept entries, no queued changes."""
    inventory._FILES.clear()
    yield
    inventory._FILES.clear()


@pytest.fixture
def example(qrm_plugins):
    """The plugin module registered the way an entry point would be."""
    assert qrm_plugins.register(qrm_example.plugin, "example")
    return qrm_plugins


def inventory_file(settings) -> Path:
    return settings.data_dir / "inventory" / "resources.json"


def test_resource_events_keep_the_inventory(qrm_ctx, example) -> None:
    path = inventory_file(qrm_ctx.settings)
    added = resources.add_resource(qrm_ctx, mac=MAC, ip="10.0.0.5", hostname="node1", cpus=2)
    data = json.loads(path.read_text())
    assert data["format"] == 1
    assert data["resources"] == [
        {
            "id": added.id,
            "mac": MAC,
            "ip": "10.0.0.5",
            "hostname": "node1",
            "kind": "physical",
            "state": "new",
            "ve": None,
            "cpus": 2,
            "memory_mb": 0,
        }
    ]

    # A state change goes through the life-cycle service; the hook fires after commit.
    row = resources.find_resource_row(qrm_ctx, MAC)
    resources.transition(qrm_ctx, row, "idle", "agent registered")
    qrm_ctx.commit()
    assert inventory.read(path)[0]["state"] == "idle"

    # Fire the hook through the facade, as core does when an agent reports new facts.
    moved = resources.show_resource(qrm_ctx, MAC).model_copy(update={"ip": "10.0.0.6"})
    example.hooks.resource_updated(moved, ["ip"], qrm_ctx.hook_ctx)
    assert inventory.read(path)[0]["ip"] == "10.0.0.6"

    second = resources.add_resource(qrm_ctx, mac="52:54:00:00:10:02")
    assert [r["id"] for r in inventory.read(path)] == [added.id, second.id]
    resources.remove_resource(qrm_ctx, MAC)
    assert [r["mac"] for r in inventory.read(path)] == ["52:54:00:00:10:02"]


def test_a_failing_write_is_recorded_and_the_change_stands(qrm_ctx, example, monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("QRM_EXAMPLE_INVENTORY_FILE", str(blocker / "resources.json"))
    resources.add_resource(qrm_ctx, mac=MAC)
    assert resources.show_resource(qrm_ctx, MAC).mac == MAC
    errors = qrm_ctx.session.exec(select(Event).where(Event.level == "error")).all()
    assert len(errors) == 1
    assert errors[0].object_name == "example"
    assert "qrm_resource_added" in errors[0].message and "cannot write inventory" in errors[0].message


def test_kernel_argument_only_when_enabled(qrm_ctx, example, monkeypatch) -> None:
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1.0", make_default=True)
    resources.add_resource(qrm_ctx, mac=MAC)
    assert "qrm.inventory" not in boot.boot_config(qrm_ctx, MAC).cmdline
    monkeypatch.setenv("QRM_EXAMPLE_KERNEL_ARG", "1")
    assert boot.boot_config(qrm_ctx, MAC).cmdline.split()[-1] == "qrm.inventory=1"
    monkeypatch.setenv("QRM_EXAMPLE_KERNEL_ARG", "maybe")
    with pytest.raises(PluginError) as info:
        boot.boot_config(qrm_ctx, MAC)
    assert "plugin 'example'" in info.value.message
    assert "invalid setting QRM_EXAMPLE_KERNEL_ARG" in info.value.message
    assert "\n" not in info.value.message


def test_a_damaged_inventory_is_reported_and_can_be_rebuilt(tmp_path) -> None:
    path = tmp_path / "resources.json"
    path.write_text("{not json")
    with pytest.raises(inventory.InventoryError, match="qrm example sync") as info:
        inventory.read(path)
    assert "\n" not in info.value.message
    assert inventory.rebuild(path, []) == 0
    assert inventory.read(path) == []


def _resource(i: int, state: str = "new") -> SimpleNamespace:
    return SimpleNamespace(
        id=i,
        mac=f"52:54:00:{i // 65536:02x}:{i // 256 % 256:02x}:{i % 256:02x}",
        ip=None,
        hostname=None,
        kind="physical",
        state=state,
        ve=None,
        cpus=0,
        memory_mb=0,
    )


def _writer(path: str, start: int) -> None:
    for i in range(start, start + 20):
        inventory.record(Path(path), _resource(i))


def test_concurrent_writers_lose_nothing(tmp_path) -> None:
    """Several qrm processes (server, CLI calls) write at once: the lock keeps every entry."""
    path = tmp_path / "inv" / "resources.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), n * 20)) for n in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [r["id"] for r in inventory.read(path)] == list(range(120))


def test_the_console_shows_a_resources_inventory_entry(qrm_ctx, example) -> None:
    from qrm_core.plugin_api import ConsoleLink, ConsolePanel

    resources.add_resource(qrm_ctx, mac=MAC, ip="10.0.0.5", hostname="node1", cpus=2)
    hooks = example.hooks
    path = str(inventory_file(qrm_ctx.settings))
    panels = hooks.console_panels("resource", MAC, qrm_ctx.hook_ctx)
    assert panels == [
        ConsolePanel(
            "Inventory",
            rows=(("file", path), ("state", "new"), ("ip", "10.0.0.5"), ("cpus", "2"), ("memory_mb", "0")),
            status="ok",
        )
    ]
    assert hooks.console_panels("resource", "52:54:00:00:99:99", qrm_ctx.hook_ctx)[0].status == "unknown"
    assert hooks.console_panels("ve", "web", qrm_ctx.hook_ctx) == []
    assert hooks.console_links("dashboard", "", qrm_ctx.hook_ctx) == [
        ConsoleLink("Inventory format", "https://example.org/qrm-inventory")
    ]
    assert hooks.console_links("resource", MAC, qrm_ctx.hook_ctx) == []


class _CountingJson:
    """The inventory module's ``json``, counting the characters it parses and serializes."""

    def __init__(self) -> None:
        self.chars = 0

    def loads(self, text: str, **kw: object) -> object:
        self.chars += len(text)
        return json.loads(text, **kw)  # type: ignore[arg-type]

    def dumps(self, obj: object, **kw: object) -> str:
        out = json.dumps(obj, **kw)  # type: ignore[arg-type]
        self.chars += len(out)
        return out


def test_a_change_costs_what_it_touches_not_the_whole_inventory(tmp_path, monkeypatch) -> None:
    """The hooks run inside each registration: a change parses and serializes
    one entry, however many the file holds (it was the whole file, parsed
    once and serialized three times, twice per registration)."""
    path = tmp_path / "resources.json"
    assert inventory.rebuild(path, [_resource(i) for i in range(2000)]) == 2000
    counting = _CountingJson()
    monkeypatch.setattr(inventory, "json", counting)
    for i in range(2000, 2010):
        inventory.record(path, _resource(i))
    inventory.record(path, _resource(7, state="idle"))
    inventory.forget(path, 5)
    # 12 changes of one entry (about 170 characters each) and a timestamp each:
    # nothing near the 2,000 entries' 350,000 characters.
    assert counting.chars < 12 * 300
    monkeypatch.undo()
    rows = inventory.read(path)
    assert [r["id"] for r in rows] == [i for i in range(2010) if i != 5]
    assert rows[6]["state"] == "idle"


def test_another_process_s_change_is_read_before_the_next_write(tmp_path) -> None:
    """The entries a process keeps are used only while the file is the one it wrote."""
    path = tmp_path / "resources.json"
    inventory.record(path, _resource(1))
    child = multiprocessing.get_context("fork").Process(target=_writer, args=(str(path), 100))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    inventory.record(path, _resource(2))
    assert [r["id"] for r in inventory.read(path)] == [1, 2, *range(100, 120)]
    path.write_text('{"format": 1, "updated_at": null, "resources": []}')  # rewritten by hand
    inventory.record(path, _resource(3))
    assert [r["id"] for r in inventory.read(path)] == [3]


def test_changes_arriving_together_share_one_write(tmp_path, monkeypatch) -> None:
    """40 request threads registering at once: while one write runs, the changes
    that arrive wait for the next, and that one write takes them all."""
    path = tmp_path / "resources.json"
    inventory.record(path, _resource(0))
    writes: list[str] = []
    real_replace = inventory.os.replace

    def replace(src: str, dst: str) -> None:
        writes.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(inventory.os, "replace", replace)
    kept = inventory._file(path)
    errors: list[inventory.InventoryError] = []

    def register(i: int) -> None:
        try:
            inventory.record(path, _resource(i))
        except inventory.InventoryError as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(1, 41)]
    with kept.write_lock:  # a write is under way
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(kept.pending) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(kept.pending) == 40
    for t in threads:
        t.join(30)
    assert not errors
    assert len(writes) == 1
    assert [r["id"] for r in inventory.read(path)] == list(range(41))


def test_a_failed_write_fails_every_change_it_carried_and_is_not_kept(tmp_path, monkeypatch) -> None:
    path = tmp_path / "resources.json"
    inventory.record(path, _resource(1))

    def full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inventory.os, "replace", full)
    with pytest.raises(inventory.InventoryError, match="No space left on device"):
        inventory.record(path, _resource(2))
    monkeypatch.undo()
    assert [r["id"] for r in inventory.read(path)] == [1]
    inventory.record(path, _resource(3))  # the failed change is not written by the next one
    assert [r["id"] for r in inventory.read(path)] == [1, 3]
    assert not list(tmp_path.glob(".*.tmp"))


def _wait_for(check, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_in_the_server_a_change_is_queued_and_a_burst_shares_few_writes(tmp_path, monkeypatch) -> None:
    """While the writer runs (qrm server), a hook returns once its change is
    queued and the writer rewrites the file at most every interval: 200
    registrations from 4 threads are a few writes, not 200."""
    path = tmp_path / "resources.json"
    writes: list[str] = []
    real_replace = inventory.os.replace

    def replace(src: str, dst: str) -> None:
        writes.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(inventory.os, "replace", replace)
    writer = inventory.Writer(interval=0.5)
    writer.start()
    try:

        def register(start: int) -> None:
            for i in range(start, start + 50):
                inventory.record(path, _resource(i))
                inventory.record(path, _resource(i, state="idle"))  # the state change that follows

        threads = [threading.Thread(target=register, args=(n * 50,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

        def complete() -> bool:
            return path.exists() and len(inventory.read(path)) == 200

        _wait_for(complete)
    finally:
        writer.stop()
    rows = inventory.read(path)
    assert [r["id"] for r in rows] == list(range(200))
    assert {r["state"] for r in rows} == {"idle"}
    assert 1 <= len(writes) <= 20
    inventory.record(path, _resource(200))  # no writer: written before it returns
    assert len(inventory.read(path)) == 201


def test_the_server_s_writer_comes_from_the_plugin_and_records_failures(
    qrm_ctx, example, monkeypatch, tmp_path
) -> None:
    services = example.hooks.collect_services(qrm_ctx.hook_ctx)
    writers = [s for s in services if isinstance(s, inventory.Writer)]
    assert len(writers) == 1
    writer = writers[0]
    writer.start()
    try:
        added = resources.add_resource(qrm_ctx, mac=MAC, ip="10.0.0.5")
        _wait_for(lambda: [r["id"] for r in inventory.read(inventory_file(qrm_ctx.settings))] == [added.id])
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        monkeypatch.setenv("QRM_EXAMPLE_INVENTORY_FILE", str(blocker / "resources.json"))
        resources.add_resource(qrm_ctx, mac="52:54:00:00:10:02")  # the hook returns: queued

        def recorded() -> list[Event]:
            qrm_ctx.session.expire_all()
            found = qrm_ctx.session.exec(select(Event).where(Event.level == "error")).all()
            qrm_ctx.commit()
            return list(found)

        _wait_for(lambda: bool(recorded()))
    finally:
        writer.stop()
    errors = recorded()
    assert len(errors) == 1, [(e.actor, e.message) for e in errors]  # once, not per attempt
    assert errors[0].object_name == "example"
    assert "cannot write inventory" in errors[0].message
    assert (
        resources.show_resource(qrm_ctx, "52:54:00:00:10:02").mac == "52:54:00:00:10:02"
    )  # the change stands
