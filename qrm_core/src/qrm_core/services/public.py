"""Turning rows into the public shapes, in bulk (no query per row).

Services build their results after committing. A read outside a transaction
would open one and, on SQLite (where every transaction takes the write lock
up front), keep other writers waiting until the session closes; so each
function here ends a transaction it had to open itself.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlmodel import Session, col, select

from qrm_core.models import (
    BootImage,
    BootImagePublic,
    FilesystemImage,
    FilesystemImagePublic,
    Partition,
    PartitionPublic,
    Resource,
    ResourcePublic,
    StorageServer,
    StorageServerPublic,
    VirtualEnvironment,
    VirtualEnvironmentPublic,
)

F = TypeVar("F", bound=Callable[..., Any])


def _own_transaction(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(session: Session, *args: Any, **kwargs: Any) -> Any:
        outside = not session.in_transaction()
        try:
            return fn(session, *args, **kwargs)
        finally:
            if outside and session.in_transaction():
                session.commit()

    return wrapper  # type: ignore[return-value]


def resource_label(resource: Resource) -> str:
    """How people name a resource: its hostname, else its MAC."""
    return resource.hostname or resource.mac


@_own_transaction
def storage_servers(session: Session, rows: Sequence[StorageServer]) -> list[StorageServerPublic]:
    ids = [r.id for r in rows]
    images: dict[int, list[str]] = defaultdict(list)
    if ids:
        for storage_id, name in session.exec(
            select(FilesystemImage.storage_id, FilesystemImage.name)
            .where(col(FilesystemImage.storage_id).in_(ids))
            .order_by(FilesystemImage.name)
        ):
            images[storage_id].append(name)
    return [
        StorageServerPublic.model_validate(
            r,
            from_attributes=True,
            update={
                "filesystem_images": images[r.id or 0],
                "settings": dict(r.settings or {}),
                "managed_from": managed_from(r.settings or {}, r.address),
            },
        )
        for r in rows
    ]


def managed_from(settings: Mapping[str, str], address: str) -> str:
    """``this machine``, or ``USER@ADDRESS[:PORT]`` for a storage server managed over SSH."""
    if not settings.get("ssh_user"):
        return "this machine"
    port = settings.get("ssh_port", "22")
    return f"{settings['ssh_user']}@{address}" + ("" if port == "22" else f":{port}")


@_own_transaction
def filesystem_images(session: Session, rows: Sequence[FilesystemImage]) -> list[FilesystemImagePublic]:
    storage_ids = {r.storage_id for r in rows}
    storages = (
        {s.id: s for s in session.exec(select(StorageServer).where(col(StorageServer.id).in_(storage_ids)))}
        if storage_ids
        else {}
    )
    used: dict[int, list[str]] = defaultdict(list)
    ids = [r.id for r in rows]
    if ids:
        for fs_id, name in session.exec(
            select(VirtualEnvironment.fs_image_id, VirtualEnvironment.name)
            .where(col(VirtualEnvironment.fs_image_id).in_(ids))
            .order_by(VirtualEnvironment.name)
        ):
            used[fs_id].append(name)
    result = []
    for r in rows:
        storage = storages[r.storage_id]
        result.append(
            FilesystemImagePublic.model_validate(
                r,
                from_attributes=True,
                update={
                    "storage": storage.name,
                    "storage_type": storage.type,
                    "used_by": used[r.id or 0],
                },
            )
        )
    return result


@_own_transaction
def boot_images(session: Session, rows: Sequence[BootImage]) -> list[BootImagePublic]:
    used: dict[int, list[str]] = defaultdict(list)
    ids = [r.id for r in rows]
    if ids:
        for boot_id, name in session.exec(
            select(VirtualEnvironment.boot_image_id, VirtualEnvironment.name)
            .where(col(VirtualEnvironment.boot_image_id).in_(ids))
            .order_by(VirtualEnvironment.name)
        ):
            used[boot_id].append(name)
    return [
        BootImagePublic.model_validate(
            r, from_attributes=True, update={"is_default": r.is_default, "used_by": used[r.id or 0]}
        )
        for r in rows
    ]


@_own_transaction
def virtual_environments(
    session: Session, rows: Sequence[VirtualEnvironment]
) -> list[VirtualEnvironmentPublic]:
    boot_ids = {r.boot_image_id for r in rows}
    fs_ids = {r.fs_image_id for r in rows}
    boots = (
        dict(session.exec(select(BootImage.id, BootImage.name).where(col(BootImage.id).in_(boot_ids))).all())
        if boot_ids
        else {}
    )
    fss = (
        dict(
            session.exec(
                select(FilesystemImage.id, FilesystemImage.name).where(col(FilesystemImage.id).in_(fs_ids))
            ).all()
        )
        if fs_ids
        else {}
    )
    members: dict[int, list[str]] = defaultdict(list)
    ids = [r.id for r in rows]
    if ids:
        for res in session.exec(
            select(Resource).where(col(Resource.ve_id).in_(ids)).order_by(col(Resource.id))
        ):
            members[res.ve_id or 0].append(resource_label(res))
    return [
        VirtualEnvironmentPublic.model_validate(
            r,
            from_attributes=True,
            update={
                "boot_image": boots[r.boot_image_id],
                "filesystem_image": fss[r.fs_image_id],
                "resources": members[r.id or 0],
            },
        )
        for r in rows
    ]


@_own_transaction
def resources(session: Session, rows: Sequence[Resource]) -> list[ResourcePublic]:
    host_ids = {r.host_id for r in rows if r.host_id is not None}
    ve_ids = {r.ve_id for r in rows if r.ve_id is not None}
    hosts = (
        {
            h.id: resource_label(h)
            for h in session.exec(select(Resource).where(col(Resource.id).in_(host_ids)))
        }
        if host_ids
        else {}
    )
    ves = (
        dict(
            session.exec(
                select(VirtualEnvironment.id, VirtualEnvironment.name).where(
                    col(VirtualEnvironment.id).in_(ve_ids)
                )
            ).all()
        )
        if ve_ids
        else {}
    )
    return [
        ResourcePublic.model_validate(
            r,
            from_attributes=True,
            update={
                "host": hosts.get(r.host_id) if r.host_id is not None else None,
                "ve": ves.get(r.ve_id) if r.ve_id is not None else None,
                "capabilities": list(r.capabilities or []),
            },
        )
        for r in rows
    ]


@_own_transaction
def partitions(session: Session, rows: Sequence[Partition]) -> list[PartitionPublic]:
    host_ids = {r.host_id for r in rows}
    ve_ids = {r.ve_id for r in rows if r.ve_id is not None}
    hosts = (
        {
            h.id: resource_label(h)
            for h in session.exec(select(Resource).where(col(Resource.id).in_(host_ids)))
        }
        if host_ids
        else {}
    )
    ves = (
        dict(
            session.exec(
                select(VirtualEnvironment.id, VirtualEnvironment.name).where(
                    col(VirtualEnvironment.id).in_(ve_ids)
                )
            ).all()
        )
        if ve_ids
        else {}
    )
    return [
        PartitionPublic.model_validate(
            r,
            from_attributes=True,
            update={"host": hosts[r.host_id], "ve": ves.get(r.ve_id) if r.ve_id else None},
        )
        for r in rows
    ]


@_own_transaction
def one_resource(session: Session, row: Resource) -> ResourcePublic:
    return resources(session, [row])[0]


@_own_transaction
def one_ve(session: Session, row: VirtualEnvironment) -> VirtualEnvironmentPublic:
    return virtual_environments(session, [row])[0]
