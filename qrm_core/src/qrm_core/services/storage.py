"""Storage servers and filesystem images."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlmodel import col, select

from qrm_core import remote
from qrm_core.drivers.base import ExportClient, StorageDriver, StorageTarget
from qrm_core.errors import AlreadyExists, InUse, InvalidInput, NotFound
from qrm_core.models import (
    EventLevel,
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

log = logging.getLogger("qrm.services.storage")


def target(storage: StorageServer) -> StorageTarget:
    return StorageTarget(
        name=storage.name,
        type=storage.type,
        address=storage.address,
        comment=storage.comment,
        settings=dict(storage.settings or {}),
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


_SETTING_KEY = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_SETTING_VALUE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?$")
#: Settings qrm itself keeps (``--ssh-user``, ``--ssh-port``), not given as ``--setting``.
SSH_KEYS = ("ssh_user", "ssh_port")


def _check_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """Per-server driver settings: ``key=value`` strings, nothing hidden in them."""
    checked: dict[str, str] = {}
    for key, value in settings.items():
        if not isinstance(key, str) or not _SETTING_KEY.fullmatch(key):
            raise InvalidInput(
                f"storage setting name {key!r} must be 1-40 lower-case letters, digits and '_', starting with a letter"
            )
        if key in SSH_KEYS:
            raise InvalidInput(f"set {key} with --{key.replace('_', '-')}, not as a setting")
        text = str(value)
        if not _SETTING_VALUE.fullmatch(text):
            raise InvalidInput(
                f"storage setting {key}: the value must be 1-255 printable characters, "
                "without leading or trailing spaces"
            )
        checked[key] = text
    return checked


@dataclass(frozen=True)
class SshChange:
    """What ``storage add`` / ``storage set`` change about reaching a server over SSH."""

    user: str | None = None
    port: int | None = None
    key: str | None = None  # the private key's text
    host_key: str | None = None  # "TYPE BASE64" (a .pub file or an ssh-keyscan line)
    local: bool = False  # forget everything SSH: the server is this machine

    @property
    def given(self) -> bool:
        return any(x is not None for x in (self.user, self.port, self.key, self.host_key)) or self.local


def _apply_ssh(settings: dict[str, str], ssh: SshChange) -> dict[str, str]:
    settings = dict(settings)
    if ssh.local:
        if any(x is not None for x in (ssh.user, ssh.port, ssh.key, ssh.host_key)):
            raise InvalidInput("--local makes the storage server this machine: give no SSH options with it")
        for key in SSH_KEYS:
            settings.pop(key, None)
        return settings
    if ssh.user is not None:
        settings["ssh_user"] = remote.check_user(ssh.user)
    if ssh.port is not None:
        settings["ssh_port"] = str(remote.check_port(ssh.port))
    if (ssh.key is not None or ssh.host_key is not None or ssh.port is not None) and not settings.get(
        "ssh_user"
    ):
        raise InvalidInput("give the SSH user (--ssh-user) that qrm logs in as")
    return settings


@contextmanager
def _ssh_files(
    ctx: ServiceContext, name: str, address: str, settings: Mapping[str, str], ssh: SshChange
) -> Iterator[None]:
    """Put the key files of a change in place; put the old ones back if what follows fails."""
    data_dir = ctx.settings.data_dir
    paths = (remote.key_file(data_dir, name), remote.known_hosts_file(data_dir, name))
    saved = {p: p.read_bytes() if p.exists() else None for p in paths}
    try:
        if ssh.local:
            remote.forget(data_dir, name)
        if ssh.key is not None:
            remote.install_key(data_dir, name, ssh.key)
        if ssh.host_key is not None:
            port = int(settings.get("ssh_port", "22"))
            remote.pin_host_key(data_dir, name, address, port, ssh.host_key)
        elif ssh.port is not None or ssh.key is not None:
            # Another port (or a new key for a rebuilt server) pins its host key anew.
            paths[1].unlink(missing_ok=True)
        if remote.is_remote_storage(settings) and not paths[0].exists():
            raise InvalidInput(
                f"storage server {name} is reached over SSH: give qrm the key (--ssh-key FILE)"
            )
        yield
    except BaseException:
        for path, data in saved.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                path.write_bytes(data)
                path.chmod(0o600)
        raise


def add_storage(
    ctx: ServiceContext,
    *,
    name: str,
    type: str,
    address: str,
    comment: str | None = None,
    settings: Mapping[str, str] | None = None,
    ssh: SshChange | None = None,
    check: bool = True,
) -> StorageServerPublic:
    """Add a storage server (openQRM: ``storage add -n NFS -t NFS -i 10.0.11.35 -c QRMSRC``).

    With ``ssh`` the server is another machine qrm manages over SSH with the key
    it is given (kept in ``<data_dir>/keys``). Unless ``check`` is off, the
    driver's :meth:`~qrm_core.drivers.base.StorageDriver.check_server` must
    reach and recognise it (no database transaction is open meanwhile):
    a server that cannot be reached, or lacks what its driver needs, is
    refused in one line and nothing is kept."""
    name = v.name(name, "storage server name")
    kind = (type or "").strip().lower()
    address = v.host_ip(address, "storage server address")
    comment = v.comment(comment)
    ssh = ssh or SshChange()
    values = _apply_ssh(_check_settings(settings or {}), ssh)
    driver = ctx.plugins.storage_driver(kind)  # DriverNotFound lists the installed types
    row = StorageServer(name=name, type=kind, address=address, comment=comment, settings=values or None)
    driver.validate_server(target(row))
    taken = ctx.session.exec(select(StorageServer.name).where(v.same_name(StorageServer.name, name))).first()
    if taken:
        raise AlreadyExists(f"storage server {taken!r} already exists")
    ctx.rollback()  # no transaction stays open across the check
    with _ssh_files(ctx, name, address, values, ssh):
        if check:
            driver.check_server(target(row))
        ctx.session.add(row)
        ctx.record(
            "storage",
            name,
            f"storage server {name} added ({kind} at {address}"
            + (
                f", managed over SSH as {public.managed_from(values, address)})"
                if remote.is_remote_storage(values)
                else ")"
            ),
        )
        ctx.commit()
    result = public.storage_servers(ctx.session, [row])[0]
    ctx.hooks.storage_added(result, ctx.hook_ctx)
    where = target(row)  # read before the rollback expires ``row``
    ctx.rollback()  # no transaction stays open across the driver
    warning = driver.export_readiness(where)
    if warning:
        # Accepted (it may be configured later); 've start' refuses until then.
        ctx.record("storage", name, f"storage server {name} cannot export yet: {warning}", EventLevel.WARNING)
        ctx.commit()
        result = result.model_copy(update={"warning": warning})
    return result


def export_readiness(ctx: ServiceContext, storage_id: int) -> tuple[str, str | None]:
    """A storage server's name, and why machines cannot have its volumes
    exported to them now (None: they can). Ends the read before asking the driver."""
    row = ctx.session.get(StorageServer, storage_id)
    if row is None:
        raise NotFound(f"storage server {storage_id} does not exist")
    where, driver = target(row), driver_for(ctx, row)
    ctx.rollback()
    return where.name, driver.export_readiness(where)


def set_storage(
    ctx: ServiceContext,
    name: str,
    *,
    comment: str | None = None,
    settings: Mapping[str, str] | None = None,
    unset: Sequence[str] = (),
    ssh: SshChange | None = None,
    check: bool = True,
) -> StorageServerPublic:
    """Change how qrm manages a storage server (``qrm storage set``): its driver
    settings, the SSH user, port, key and host key, or ``--local``. The changed
    server is checked as at ``add`` before anything is kept; a refused change
    leaves the old settings and key files in place."""
    row = get_storage_row(ctx, name)
    ssh = ssh or SshChange()
    if comment is None and not settings and not unset and not ssh.given:
        raise InvalidInput("nothing to change: give settings, SSH options or a comment")
    values = dict(row.settings or {})
    for key in unset:
        if key in SSH_KEYS:
            raise InvalidInput(f"{key} is not unset by --unset: use --local to make the server this machine")
        if key not in values:
            raise NotFound(f"storage server {name} has no setting {key!r}")
        values.pop(key)
    values.update(_check_settings(settings or {}))
    values = _apply_ssh(values, ssh)
    new_comment = v.comment(comment) if comment is not None else row.comment
    if values == (row.settings or {}) and new_comment == row.comment and not ssh.given:
        return public.storage_servers(ctx.session, [row])[0]  # as it is already: nothing to do
    driver = driver_for(ctx, row)
    changed = StorageServer(
        name=row.name, type=row.type, address=row.address, comment=new_comment, settings=values
    )
    driver.validate_server(target(changed))
    ctx.rollback()  # no transaction stays open across the check (``row`` is expired: use ``changed``)
    with _ssh_files(ctx, changed.name, changed.address, values, ssh):
        if check:
            driver.check_server(target(changed))
        row = get_storage_row(ctx, name)
        row.settings = values or None
        row.comment = new_comment
        ctx.session.add(row)
        shown = ", ".join(f"{k}={values[k]}" for k in sorted(values) if k not in SSH_KEYS) or "no settings"
        extra = " (new SSH key)" if ssh.key is not None else ""
        ctx.record(
            "storage",
            name,
            f"storage server {name} changed: managed from {public.managed_from(values, row.address)}{extra}; {shown}",
        )
        ctx.commit()
    return public.storage_servers(ctx.session, [row])[0]


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
    remote.forget(ctx.settings.data_dir, name)  # its SSH key and pinned host key
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
    fill_from: str | None = None,
    sha256: str | None = None,
) -> FilesystemImagePublic:
    """Record an existing volume as a filesystem image (``location``), or create
    an empty volume of ``size_mb`` through the storage driver; with ``fill_from``
    (``--auto``) an empty one filled on the first start of a VE that uses it
    (:func:`qrm_core.services.images.add_auto_image`)."""
    if fill_from is not None or sha256 is not None:
        from qrm_core.services.images import add_auto_image

        if location is not None or size_mb is None or fill_from is None:
            raise InvalidInput("an --auto image is a new volume: give --size and --fill-from, not a location")
        return add_auto_image(
            ctx,
            name=name,
            storage=storage,
            fill_from=fill_from,
            size_mb=size_mb,
            sha256=sha256,
            comment=comment,
        )
    name = v.name(name, "filesystem image name")
    comment = v.comment(comment)
    storage_row = get_storage_row(ctx, storage)
    assert storage_row.id is not None
    driver = driver_for(ctx, storage_row)
    if (location is None) == (size_mb is None):
        raise InvalidInput("give either a location (an existing volume) or a size (a new, empty volume)")
    taken_name = ctx.session.exec(
        select(FilesystemImage.name).where(v.same_name(FilesystemImage.name, name))
    ).first()
    if taken_name:
        raise AlreadyExists(f"filesystem image {taken_name!r} already exists")
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
        ctx.session.add(row)
        ctx.record("filesystem-image", name, message)
        ctx.commit()
    else:
        assert size_mb is not None
        v.positive(size_mb, "size (MB)")
        where = target(storage_row)
        storage_id, storage_name = storage_row.id, storage_row.name
        ctx.commit()  # the read ends here: no driver call inside a transaction
        volume = driver.create_volume(where, name, size_mb)
        try:
            row = FilesystemImage(
                name=name,
                storage_id=storage_id,
                location=volume.location,
                origin=ImageOrigin.EMPTY.value,
                size_mb=volume.size_mb,
                state=ImageState.READY.value,
                comment=comment,
            )
            ctx.session.add(row)
            ctx.record(
                "filesystem-image",
                name,
                f"filesystem image {name} created ({size_mb} MB on {storage_name}:{volume.location})",
            )
            ctx.commit()
        except BaseException:
            # The volume exists but its record does not (the commit failed: a
            # concurrent image of the same name, a database error): remove it
            # again rather than leave an orphan behind.
            ctx.rollback()
            try:
                driver.remove_volume(where, volume.location)
            except Exception as exc:  # noqa: BLE001 - the first error is the one to report
                log.error(
                    "filesystem image %s: volume %s on %s was created but not recorded and cannot be "
                    "removed: %s",
                    name,
                    volume.location,
                    storage_name,
                    exc,
                )
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


def _image_users(ctx: ServiceContext, image_id: int | None) -> list[str]:
    return list(
        ctx.session.exec(
            select(VirtualEnvironment.name)
            .where(VirtualEnvironment.fs_image_id == image_id)
            .order_by(col(VirtualEnvironment.name))
        ).all()
    )


def remove_filesystem_image(ctx: ServiceContext, name: str, *, purge: bool = False) -> FilesystemImagePublic:
    """Forget a filesystem image; with ``purge`` also destroy its volume (read,
    commit, destroy, record: no transaction is open while the storage server
    works, and no capture, clone or snapshot of the image runs meanwhile)."""
    row = get_fs_image_row(ctx, name)
    users = _image_users(ctx, row.id)
    if users:
        raise InUse(f"filesystem image {name!r} is used by virtual environment(s) {', '.join(users)}")
    result = public.filesystem_images(ctx.session, [row])[0]
    if purge:
        from qrm_core.services.images import job_lock

        storage_row = ctx.session.get(StorageServer, row.storage_id)
        assert storage_row is not None
        driver, where, location, image_id = (
            driver_for(ctx, storage_row),
            target(storage_row),
            row.location,
            row.id,
        )
        ctx.commit()  # the read ends here: no driver call inside a transaction
        with job_lock(ctx, name):
            driver.remove_volume(where, location)
        found = ctx.session.get(FilesystemImage, image_id, populate_existing=True)
        users = _image_users(ctx, image_id) if found is not None else []
        if found is None or users:
            # Removed by someone else, or given to a VE, while its volume was destroyed.
            taken = f"; virtual environment(s) {', '.join(users)} use it now" if users else ""
            ctx.record(
                "filesystem-image",
                name,
                f"filesystem image {name}: volume destroyed"
                + (taken if users else " (its record was removed meanwhile)"),
                level=EventLevel.ERROR if users else EventLevel.INFO,
            )
            ctx.commit()
            if users:
                raise InUse(f"filesystem image {name!r}: its volume was destroyed{taken}")
            return result
        row = found
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


#: The naming authority of the iSCSI initiator names qrm gives its machines.
INITIATOR_PREFIX = "iqn.2026-12.org.qrm"


def initiator_name(mac: str) -> str:
    """The stable iSCSI initiator name of the machine with ``mac``
    (``iqn.2026-12.org.qrm:525400123456``): the same across reboots and
    failovers, known before the machine boots."""
    return f"{INITIATOR_PREFIX}:{mac.replace(':', '').lower()}"


def export_client(resource: Resource) -> ExportClient:
    """A resource as storage drivers see it."""
    return ExportClient(
        mac=resource.mac, ip=resource.ip, hostname=resource.hostname, initiator=initiator_name(resource.mac)
    )


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
    return VolumeAccess(
        driver_for(ctx, storage_row), target(storage_row), fs.location, export_client(resource)
    )


def export_to(ctx: ServiceContext, ve_id: int, resource: Resource) -> None:
    """Give ``resource`` access to the VE's filesystem image before it boots into it."""
    volume_access(ctx, ve_id, resource).grant()


def unexport_from(ctx: ServiceContext, ve_id: int, resource: Resource) -> None:
    """Withdraw ``resource``'s access to the VE's filesystem image (it left the VE)."""
    volume_access(ctx, ve_id, resource).withdraw()
