"""Storage servers and filesystem images."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import col, select

from qrm_core.drivers.base import ExportClient, StorageDriver, StorageTarget
from qrm_core.errors import AlreadyExists, InUse, InvalidInput, NotFound
from qrm_core.models import (
    FilesystemImage,
    FilesystemImagePublic,
    ImageOrigin,
    ImageState,
    Resource,
    StorageServer,
    StorageServerPublic,
    VirtualEnvironment,
)
from qrm_core.services import ServiceContext, public
from qrm_core.services import validation as v


def target(storage: StorageServer) -> StorageTarget:
    return StorageTarget(
        name=storage.name, type=storage.type, address=storage.address, comment=storage.comment
    )


def driver_for(ctx: ServiceContext, storage: StorageServer) -> StorageDriver:
    return ctx.plugins.storage_driver(storage.type)


# ---------------------------------------------------------------------------
# Storage servers
# ---------------------------------------------------------------------------


def get_storage_row(ctx: ServiceContext, name: str) -> StorageServer:
    row = ctx.session.exec(select(StorageServer).where(StorageServer.name == name)).first()
    if row is None:
        raise NotFound(f"storage server {name!r} does not exist")
    return row


def add_storage(
    ctx: ServiceContext, *, name: str, type: str, address: str, comment: str | None = None
) -> StorageServerPublic:
    """Add a storage server (openQRM: ``storage add -n NFS -t NFS -i 10.0.11.35 -c QRMSRC``)."""
    name = v.name(name, "storage server name")
    kind = (type or "").strip().lower()
    address = v.ip(address, "storage server address")
    comment = v.comment(comment)
    driver = ctx.plugins.storage_driver(kind)  # DriverNotFound lists the installed types
    row = StorageServer(name=name, type=kind, address=address, comment=comment)
    driver.validate_server(target(row))
    if ctx.session.exec(select(StorageServer.id).where(StorageServer.name == name)).first():
        raise AlreadyExists(f"storage server {name!r} already exists")
    ctx.session.add(row)
    ctx.record("storage", name, f"storage server {name} added ({kind} at {address})")
    ctx.commit()
    result = public.storage_servers(ctx.session, [row])[0]
    ctx.hooks.storage_added(result, ctx.hook_ctx)
    return result


def list_storage(ctx: ServiceContext) -> list[StorageServerPublic]:
    rows = ctx.session.exec(select(StorageServer).order_by(StorageServer.name)).all()
    return public.storage_servers(ctx.session, rows)


def show_storage(ctx: ServiceContext, name: str) -> StorageServerPublic:
    return public.storage_servers(ctx.session, [get_storage_row(ctx, name)])[0]


def remove_storage(ctx: ServiceContext, name: str) -> StorageServerPublic:
    row = get_storage_row(ctx, name)
    images = ctx.session.exec(
        select(FilesystemImage.name)
        .where(FilesystemImage.storage_id == row.id)
        .order_by(FilesystemImage.name)
    ).all()
    if images:
        raise InUse(
            f"storage server {name!r} holds filesystem image(s) {', '.join(images)}; remove them first"
        )
    result = public.storage_servers(ctx.session, [row])[0]
    ctx.session.delete(row)
    ctx.record("storage", name, f"storage server {name} removed")
    ctx.commit()
    ctx.hooks.storage_removed(result, ctx.hook_ctx)
    return result


# ---------------------------------------------------------------------------
# Filesystem images
# ---------------------------------------------------------------------------


def get_fs_image_row(ctx: ServiceContext, name: str) -> FilesystemImage:
    row = ctx.session.exec(select(FilesystemImage).where(FilesystemImage.name == name)).first()
    if row is None:
        raise NotFound(f"filesystem image {name!r} does not exist")
    return row


def add_filesystem_image(
    ctx: ServiceContext,
    *,
    name: str,
    storage: str,
    location: str | None = None,
    size_mb: int | None = None,
    comment: str | None = None,
) -> FilesystemImagePublic:
    """Record an existing volume as a filesystem image (``location``), or create
    an empty volume of ``size_mb`` through the storage driver."""
    name = v.name(name, "filesystem image name")
    comment = v.comment(comment)
    storage_row = get_storage_row(ctx, storage)
    assert storage_row.id is not None
    driver = driver_for(ctx, storage_row)
    if (location is None) == (size_mb is None):
        raise InvalidInput("give either a location (an existing volume) or a size (a new, empty volume)")
    if ctx.session.exec(select(FilesystemImage.id).where(FilesystemImage.name == name)).first():
        raise AlreadyExists(f"filesystem image {name!r} already exists")
    if location is not None:
        location = location.strip()
        driver.validate_location(target(storage_row), location)
        taken = ctx.session.exec(
            select(FilesystemImage.name).where(
                FilesystemImage.storage_id == storage_row.id, FilesystemImage.location == location
            )
        ).first()
        if taken:
            raise AlreadyExists(
                f"location {location} on {storage_row.name} is already filesystem image {taken!r}"
            )
        row = FilesystemImage(
            name=name,
            storage_id=storage_row.id,
            location=location,
            origin=ImageOrigin.IMPORTED.value,
            comment=comment,
        )
        message = f"filesystem image {name} added ({storage_row.name}:{location})"
    else:
        assert size_mb is not None
        v.positive(size_mb, "size (MB)")
        volume = driver.create_volume(target(storage_row), name, size_mb)
        row = FilesystemImage(
            name=name,
            storage_id=storage_row.id,
            location=volume.location,
            origin=ImageOrigin.EMPTY.value,
            size_mb=volume.size_mb,
            state=ImageState.READY.value,
            comment=comment,
        )
        message = f"filesystem image {name} created ({size_mb} MB on {storage_row.name}:{volume.location})"
    ctx.session.add(row)
    ctx.record("filesystem-image", name, message)
    try:
        ctx.commit()
    except Exception:
        if size_mb is not None:
            # Do not leave an orphan volume behind a failed commit.
            driver.remove_volume(target(storage_row), row.location)
        raise
    result = public.filesystem_images(ctx.session, [row])[0]
    ctx.hooks.filesystem_image_added(result, ctx.hook_ctx)
    return result


def list_filesystem_images(ctx: ServiceContext, *, storage: str | None = None) -> list[FilesystemImagePublic]:
    query = select(FilesystemImage).order_by(FilesystemImage.name)
    if storage is not None:
        query = query.where(FilesystemImage.storage_id == get_storage_row(ctx, storage).id)
    return public.filesystem_images(ctx.session, ctx.session.exec(query).all())


def show_filesystem_image(ctx: ServiceContext, name: str) -> FilesystemImagePublic:
    return public.filesystem_images(ctx.session, [get_fs_image_row(ctx, name)])[0]


def remove_filesystem_image(ctx: ServiceContext, name: str, *, purge: bool = False) -> FilesystemImagePublic:
    """Forget a filesystem image; with ``purge`` also destroy its volume."""
    row = get_fs_image_row(ctx, name)
    users = ctx.session.exec(
        select(VirtualEnvironment.name)
        .where(VirtualEnvironment.fs_image_id == row.id)
        .order_by(col(VirtualEnvironment.name))
    ).all()
    if users:
        raise InUse(f"filesystem image {name!r} is used by virtual environment(s) {', '.join(users)}")
    result = public.filesystem_images(ctx.session, [row])[0]
    storage_row = ctx.session.get(StorageServer, row.storage_id)
    assert storage_row is not None
    if purge:
        driver_for(ctx, storage_row).remove_volume(target(storage_row), row.location)
    ctx.session.delete(row)
    ctx.record(
        "filesystem-image",
        name,
        f"filesystem image {name} removed" + (" and its volume destroyed" if purge else ""),
    )
    ctx.commit()
    ctx.hooks.filesystem_image_removed(result, ctx.hook_ctx)
    return result


# ---------------------------------------------------------------------------
# Exports to the machines that boot a VE's filesystem image
# ---------------------------------------------------------------------------


def _ve_volume(ctx: ServiceContext, ve_id: int) -> tuple[StorageServer, FilesystemImage]:
    ve = ctx.session.get(VirtualEnvironment, ve_id)
    if ve is None:
        raise NotFound(f"virtual environment {ve_id} does not exist")
    fs = ctx.session.get(FilesystemImage, ve.fs_image_id)
    assert fs is not None
    storage_row = ctx.session.get(StorageServer, fs.storage_id)
    assert storage_row is not None
    return storage_row, fs


def _client(resource: Resource) -> ExportClient:
    return ExportClient(mac=resource.mac, ip=resource.ip, hostname=resource.hostname)


@dataclass(frozen=True)
class VolumeAccess:
    """One resource's access to a VE's filesystem image, with everything the
    storage driver needs read from the database beforehand: the driver call
    (an NFS server, an iSCSI target: it can take a while) can then run with
    no database transaction open, so it holds no lock."""

    driver: StorageDriver
    target: StorageTarget
    location: str
    client: ExportClient

    def grant(self) -> None:
        self.driver.export_volume(self.target, self.location, self.client)

    def withdraw(self) -> None:
        self.driver.unexport_volume(self.target, self.location, self.client)


def volume_access(ctx: ServiceContext, ve_id: int, resource: Resource) -> VolumeAccess:
    storage_row, fs = _ve_volume(ctx, ve_id)
    return VolumeAccess(driver_for(ctx, storage_row), target(storage_row), fs.location, _client(resource))


def export_to(ctx: ServiceContext, ve_id: int, resource: Resource) -> None:
    """Give ``resource`` access to the VE's filesystem image before it boots into it."""
    volume_access(ctx, ve_id, resource).grant()


def unexport_from(ctx: ServiceContext, ve_id: int, resource: Resource) -> None:
    """Withdraw ``resource``'s access to the VE's filesystem image (it left the VE)."""
    volume_access(ctx, ve_id, resource).withdraw()
