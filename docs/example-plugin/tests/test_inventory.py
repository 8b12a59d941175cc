"""The inventory follows resource events; hooks run through the real pluggy manager."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from sqlmodel import select

import qrm_example.plugin
from qrm_core.errors import PluginError
from qrm_core.models import Event
from qrm_core.services import boot, boot_images, resources
from qrm_example import inventory

MAC = "52:54:00:00:10:01"


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


def _writer(path: str, start: int) -> None:
    from types import SimpleNamespace

    for i in range(start, start + 20):
        inventory.record(
            Path(path),
            SimpleNamespace(
                id=i,
                mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}",
                ip=None,
                hostname=None,
                kind="physical",
                state="new",
                ve=None,
                cpus=0,
                memory_mb=0,
            ),
        )


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
