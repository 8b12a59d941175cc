"""What Nagios should know, read from qrm through its services (read-only).

A full render reads every resource, VE, filesystem image and storage server
once; a change reads only the objects it touches, so its cost does not grow
with the number of resources.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from qrm_core.plugin_api import (
    MonitoredResource,
    NotFound,
    ResourcePublic,
    Settings,
    StorageServerPublic,
    VirtualEnvironmentPublic,
    list_resources,
    list_storage,
    monitoring_view,
    read_context,
    show_filesystem_image,
    show_resource,
    show_ve,
)
from qrm_nagios.render import HostRecord, StorageRecord

ACTOR = "plugin:nagios"


@contextmanager
def reading(core: Settings) -> Iterator[Any]:
    """A read-only service context (core's ``read_context``): it never takes
    SQLite's write lock, so a hook that runs while another transaction is open
    does not wait for it, and it loads no plugins."""
    with read_context(core) as ctx:
        yield ctx


@dataclass
class Inventory:
    """Everything Nagios should know about."""

    hosts: list[HostRecord] = field(default_factory=list)
    storage: list[StorageRecord] = field(default_factory=list)
    ves: list[str] = field(default_factory=list)
    resources: list[MonitoredResource] = field(default_factory=list)


def storage_record(storage: StorageServerPublic) -> StorageRecord:
    return StorageRecord(storage_id=storage.id, name=storage.name, type=storage.type, address=storage.address)


#: (VE id, image name) -> the image's storage server. Safe to keep for the
#: process: an image cannot be removed while a VE uses it, and it never moves
#: to another server; a VE made again under the same name has a new id.
_image_storage: dict[tuple[int, str], str] = {}
_image_lock = threading.Lock()


class VeFacts:
    """Per VE: its monitor checks and the storage server of its filesystem image (looked up once)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self._facts: dict[str, tuple[tuple[str, ...], str | None]] = {}

    def get(self, name: str) -> tuple[tuple[str, ...], str | None]:
        found = self._facts.get(name)
        if found is None:
            try:
                ve = show_ve(self.ctx, name)
            except NotFound:
                found = ((), None)
            else:
                found = (tuple(ve.monitor), self._storage_of(ve))
            self._facts[name] = found
        return found

    def _storage_of(self, ve: VirtualEnvironmentPublic) -> str | None:
        key = (ve.id, ve.filesystem_image)
        with _image_lock:
            known = _image_storage.get(key)
        if known is not None:
            return known
        try:
            storage = show_filesystem_image(self.ctx, ve.filesystem_image).storage
        except NotFound:
            return None
        with _image_lock:
            _image_storage[key] = storage
        return storage


def host_record(resource: ResourcePublic, facts: VeFacts) -> HostRecord:
    """A resource's Nagios record, its VE's checks and storage looked up once per batch."""
    checks: tuple[str, ...] = ()
    storage = None
    if resource.ve is not None:
        checks, storage = facts.get(resource.ve)
    parent = _parent_if_monitored(facts.ctx, resource.host) if resource.host is not None else None
    return HostRecord(
        resource_id=resource.id,
        label=resource.hostname or resource.mac,
        mac=resource.mac,
        address=resource.ip,
        parent=parent,
        ve=resource.ve,
        storage=storage,
        checks=checks,
    )


def _parent_if_monitored(ctx: Any, label: str) -> str | None:

    try:
        host = show_resource(ctx, label)
    except NotFound:
        return None
    return label if host.ip else None


def inventory(core: Settings) -> Inventory:
    """Every resource, VE and storage server (core's lean monitoring view: two queries)."""
    with reading(core) as ctx:
        machines, ve_list = monitoring_view(ctx)
        servers = list_storage(ctx)
    by_ve = {ve.name: ve for ve in ve_list}
    labels = {m.id: m.label for m in machines if m.ip}
    hosts = []
    for machine in machines:
        if not machine.ip:
            continue
        ve = by_ve.get(machine.ve) if machine.ve is not None else None
        hosts.append(
            HostRecord(
                resource_id=machine.id,
                label=machine.label,
                mac=machine.mac,
                address=machine.ip,
                parent=labels.get(machine.host_id) if machine.host_id is not None else None,
                ve=machine.ve,
                storage=ve.storage if ve is not None else None,
                checks=ve.monitor if ve is not None else (),
            )
        )
    return Inventory(
        hosts=hosts,
        storage=[storage_record(s) for s in servers],
        ves=[ve.name for ve in ve_list],
        resources=machines,
    )


def resources_by_id(ctx: Any, ids: set[int]) -> dict[int, ResourcePublic | None]:
    """The resources with these ids as they are now (None: gone)."""

    found: dict[int, ResourcePublic | None] = {}
    for resource_id in sorted(ids):
        try:
            found[resource_id] = show_resource(ctx, resource_id)
        except NotFound:
            found[resource_id] = None
    return found


def ve_members(ctx: Any, name: str) -> list[ResourcePublic]:

    try:
        return list_resources(ctx, ve=name).items
    except NotFound:
        return []
