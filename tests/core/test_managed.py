"""Managed hosts (services/managed.py) and plugins' records (services/plugin_data.py), on every database.

A plugin that reads another manager (qrm-vmware and vCenter) hands core the
manager's complete list of hosts; core keeps the host resources in step.
"""

from __future__ import annotations

import pytest
from sqlmodel import select

from qrm_core.engine.reconciler import Reconciler
from qrm_core.errors import InvalidInput
from qrm_core.models import Event, Partition, Resource
from qrm_core.services import plugin_data, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.services.managed import (
    ManagedHost,
    ObservedPartition,
    hostname_for,
    list_managed,
    observe_partitions,
    sync_managed_hosts,
)

MANAGER = "vmware:vc1"


def host(n: int, **changes) -> ManagedHost:
    values = {
        "mac": f"02:00:00:00:00:{n:02x}",
        "name": f"esx{n:02d}.example.com",
        "hypervisor": "fake",
        "cpus": 8,
        "memory_mb": 16384,
        "uri": f"fake://vc1/host-{n}",
        "free_memory_mb": 12000,
        "load": 0.5,
        "comment": f"ESXi host esx{n:02d} of vCenter vc1",
    }
    values.update(changes)
    return ManagedHost(**values)


def rows(ctx) -> dict[str, Resource]:
    ctx.session.expire_all()
    return {r.hostname: r for r in ctx.session.exec(select(Resource).where(Resource.managed_by == MANAGER))}


def events(ctx) -> list[str]:
    return [e.message for e in ctx.session.exec(select(Event).order_by(Event.id))]


def test_hosts_are_added_updated_and_kept_when_gone(qrm_ctx) -> None:
    report = sync_managed_hosts(qrm_ctx, MANAGER, [host(1), host(2)])
    assert sorted(report.added) == ["esx01", "esx02"]
    found = rows(qrm_ctx)
    one = found["esx01"]
    assert (one.kind, one.state, one.hypervisor, one.capabilities) == ("physical", "idle", "fake", ["fake"])
    assert (one.cpus, one.memory_mb, one.free_memory_mb, one.load) == (8, 16384, 12000, 0.5)
    assert (one.hypervisor_uri, one.managed_by, one.last_seen) == ("fake://vc1/host-1", MANAGER, None)
    assert [r.hostname for r in list_managed(qrm_ctx, MANAGER)] == ["esx01", "esx02"]
    # Unchanged: no event; capacity moves quietly; a state change is recorded.
    before = len(events(qrm_ctx))
    again = sync_managed_hosts(qrm_ctx, MANAGER, [host(1, free_memory_mb=9000), host(2)])
    assert (again.added, again.changed, again.unchanged) == ([], [], 2)
    assert rows(qrm_ctx)["esx01"].free_memory_mb == 9000 and len(events(qrm_ctx)) == before
    sync_managed_hosts(
        qrm_ctx,
        MANAGER,
        [host(1, cpus=16), host(2, state="error", reason="vCenter reports the host disconnected")],
    )
    found = rows(qrm_ctx)
    assert found["esx01"].cpus == 16 and found["esx02"].state == "error"
    assert any("esx02 idle -> error: vCenter reports the host disconnected" in m for m in events(qrm_ctx))
    # Gone from the manager: kept, off, marked once.
    gone = sync_managed_hosts(qrm_ctx, MANAGER, [host(1, cpus=16)])
    assert gone.removed == ["esx02"]
    kept = rows(qrm_ctx)["esx02"]
    assert kept.state == "off" and kept.comment.startswith(f"gone from {MANAGER} since ")
    assert sync_managed_hosts(qrm_ctx, MANAGER, [host(1, cpus=16)]).removed == []
    assert sum("is no longer in vmware:vc1" in m for m in events(qrm_ctx)) == 1
    # Back in the manager: idle again, its comment restored.
    back = sync_managed_hosts(qrm_ctx, MANAGER, [host(1, cpus=16), host(2)])
    assert back.changed == ["esx02"]
    assert rows(qrm_ctx)["esx02"].state == "idle" and rows(qrm_ctx)["esx02"].comment.startswith("ESXi host")


def test_names_macs_and_managers(qrm_ctx) -> None:
    from qrm_core.services import resources

    resources.add_resource(qrm_ctx, mac="52:54:00:00:00:01", hostname="esx01")
    resources.add_resource(qrm_ctx, mac="02:00:00:00:00:09")
    report = sync_managed_hosts(qrm_ctx, MANAGER, [host(1), host(3, name="esx01.other.org"), host(9)])
    assert sorted(report.added) == ["esx01-2", "esx01-3"]  # esx01 is taken by a machine of its own
    assert report.problems == [
        "esx09.example.com: MAC 02:00:00:00:00:09 belongs to resource 02:00:00:00:00:09 already"
    ]
    with pytest.raises(InvalidInput, match="invalid manager name"):
        sync_managed_hosts(qrm_ctx, "no colon", [])
    with pytest.raises(InvalidInput, match="state 'active'"):
        sync_managed_hosts(qrm_ctx, MANAGER, [host(4, state="active")])
    with pytest.raises(InvalidInput, match="invalid MAC"):
        sync_managed_hosts(qrm_ctx, MANAGER, [host(4, mac="01:00:5e:00:00:01")])
    assert hostname_for("10.0.0.5") == "10-0-0-5" and hostname_for("DC0_C0_H0") == "DC0-C0-H0"


def test_a_managed_host_is_never_placed_into_a_ve(qrm_ctx, qrm_settings, qrm_plugins, tmp_path) -> None:
    sync_managed_hosts(qrm_ctx, MANAGER, [host(1)])
    storage.add_storage(qrm_ctx, name="st", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="root", storage="st", location="/exports/root")
    from qrm_core.services import boot_images

    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1", make_default=True)
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    Reconciler(qrm_settings, qrm_plugins).tick()
    qrm_ctx.session.expire_all()
    assert rows(qrm_ctx)["esx01"].ve_id is None and rows(qrm_ctx)["esx01"].state == "idle"
    assert ves.show_ve(qrm_ctx, "web").resources == []


def test_partitions_follow_what_the_manager_sees(qrm_ctx) -> None:
    sync_managed_hosts(qrm_ctx, MANAGER, [host(1), host(2)])
    found = rows(qrm_ctx)
    a, b = found["esx01"], found["esx02"]
    guest = Resource(mac="52:54:00:aa:00:01", kind="virtual", host_id=a.id, state="idle")
    qrm_ctx.session.add(guest)
    qrm_ctx.session.flush()
    for name, mac, state, resource_id in (
        ("p1", "52:54:00:aa:00:01", "running", guest.id),
        ("p2", "52:54:00:aa:00:02", "running", None),
        ("p3", "52:54:00:aa:00:03", "stopped", None),
    ):
        qrm_ctx.session.add(
            Partition(
                name=name, host_id=a.id, hypervisor="fake", mac=mac, state=state, resource_id=resource_id
            )
        )
    qrm_ctx.session.commit()
    seen = {
        "52:54:00:aa:00:01": ObservedPartition(state="running", host_uri="fake://vc1/host-2"),  # vMotion
        "52:54:00:aa:00:02": ObservedPartition(state="paused", host_uri="fake://vc1/host-1"),
    }
    changes = observe_partitions(qrm_ctx, MANAGER, seen)
    assert sorted(changes) == ["p1 -> esx02", "p2 paused", "p3 gone"]
    qrm_ctx.session.expire_all()
    parts = {p.name: p for p in qrm_ctx.session.exec(select(Partition))}
    assert parts["p1"].host_id == b.id and qrm_ctx.session.get(Resource, guest.id).host_id == b.id
    assert (parts["p2"].state, parts["p3"].state) == ("paused", "error")
    assert observe_partitions(qrm_ctx, MANAGER, seen) == []  # nothing new
    # A few announced changes only: the others are not taken for gone.
    partial = {"52:54:00:aa:00:02": ObservedPartition(state="running", host_uri="fake://vc1/host-1")}
    assert observe_partitions(qrm_ctx, MANAGER, partial, complete=False) == ["p2 running"]


def test_plugin_records(qrm_ctx, qrm_settings) -> None:
    plugin_data.put_record(qrm_ctx, "vmware", "connection/vc1", {"url": "https://vc", "n": 1})
    plugin_data.put_record(qrm_ctx, "vmware", "connection/vc2", {"url": "https://vc2"})
    plugin_data.put_record(qrm_ctx, "other", "connection/vc1", {"mine": True})
    qrm_ctx.commit()
    assert plugin_data.get_record(qrm_ctx, "vmware", "connection/vc1") == {"url": "https://vc", "n": 1}
    assert list(plugin_data.list_records(qrm_ctx, "vmware", "connection/")) == [
        "connection/vc1",
        "connection/vc2",
    ]
    assert plugin_data.list_records(qrm_ctx, "vmware", "conn%") == {}  # a prefix, not a pattern
    plugin_data.put_record(qrm_ctx, "vmware", "connection/vc1", {"url": "https://vc", "n": 2})
    qrm_ctx.commit()
    assert plugin_data.read_record(qrm_settings, "vmware", "connection/vc1") == {"url": "https://vc", "n": 2}
    assert plugin_data.delete_record(qrm_ctx, "vmware", "connection/vc2") is True
    assert plugin_data.delete_record(qrm_ctx, "vmware", "connection/vc2") is False
    qrm_ctx.commit()
    assert plugin_data.read_record(qrm_settings, "vmware", "connection/vc2") is None
    for plugin, key in (("Bad", "k"), ("vmware", ""), ("vmware", "a b"), ("vmware", "x" * 129)):
        with pytest.raises(InvalidInput):
            plugin_data.get_record(qrm_ctx, plugin, key)
    with pytest.raises(InvalidInput, match="JSON object"):
        plugin_data.put_record(qrm_ctx, "vmware", "k", ["not", "an", "object"])  # type: ignore[arg-type]


def test_a_managed_host_is_not_told_to_reboot_or_halt(qrm_cli, qrm_ctx) -> None:
    """It runs no qrm agent: an order for its next heartbeat would wait for ever."""
    sync_managed_hosts(qrm_ctx, MANAGER, [host(1)])
    before = events(qrm_ctx)
    qrm_ctx.session.commit()  # end the read: the CLI writes from another session
    for verb in ("reboot", "halt"):
        result = qrm_cli("resource", verb, "esx01")
        assert result.exit_code == 1
        assert result.stderr == (
            f"error: resource esx01 is managed by {MANAGER} and runs no qrm agent; {verb} it through its manager\n"
        )
    assert events(qrm_ctx) == before and rows(qrm_ctx)["esx01"].pending_command is None
