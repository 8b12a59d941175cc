"""Filesystem images made from something: captured from a running machine, cloned,
snapshotted, reverted; and a VE given back what it started with (``qrm ve reset``).

Every operation reads what it needs, ends the transaction, calls the storage
driver (which may take minutes: an rsync, a copy), then records the outcome
in a new short transaction: no database lock is held while a backend works.
A long job (a capture) writes its progress into the image's ``progress``
column every few seconds, so every client (CLI, API, console) can show it,
and holds a lock file (``<data_dir>/locks/fs-image-<name>.lock``) so two jobs
never work on one image at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlmodel import col, select

from qrm_core import capture
from qrm_core.drivers.base import StorageDriver, StorageTarget, VolumeInfo
from qrm_core.errors import AlreadyExists, Conflict, DriverError, InUse, InvalidInput, NotFound, QrmError
from qrm_core.models import (
    EventLevel,
    FilesystemImage,
    FilesystemImagePublic,
    ImageOrigin,
    ImageSnapshotPublic,
    ImageState,
    Resource,
    ResourceState,
    StorageServer,
    VEDesiredState,
    VEState,
    VirtualEnvironment,
    VirtualEnvironmentPublic,
    utcnow,
)
from qrm_core.remote import shell_quote, storage_runner
from qrm_core.services import ServiceContext, local_fill, public
from qrm_core.services import validation as v
from qrm_core.services.storage import driver_for, get_fs_image_row, get_storage_row, target

if TYPE_CHECKING:
    from pathlib import Path

    from qrm_core.archive import ArchiveInfo
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem

#: The snapshot a pristine VE's image keeps of its first start.
PRISTINE_LABEL = "qrm-pristine"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Default size of a captured image's volume (MB) when none is given: a file-backed
#: LUN is sparse, an NFS directory shares its filesystem's space.
DEFAULT_CAPTURE_MB = 8192
ProgressFn = Callable[[str], None]


def check_label(label: str) -> str:
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise InvalidInput(
            f"snapshot label {label!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return label


def _image_and_storage(ctx: ServiceContext, name: str) -> tuple[FilesystemImage, StorageServer]:
    row = get_fs_image_row(ctx, name)
    storage_row = ctx.session.get(StorageServer, row.storage_id)
    assert storage_row is not None
    return row, storage_row


def _needs(driver: StorageDriver, storage: StorageTarget, *operations: str) -> None:
    supported = driver.supported_operations(storage)
    for operation in operations:
        if operation not in supported:
            raise driver.unsupported(operation, storage.name)


def _busy_users(ctx: ServiceContext, fs_id: int | None) -> list[str]:
    """VEs on the image that run, or are asked to (an image under a machine is not touched)."""
    return list(
        ctx.session.exec(
            select(VirtualEnvironment.name)
            .where(
                VirtualEnvironment.fs_image_id == fs_id,
                (VirtualEnvironment.desired_state != VEDesiredState.STOPPED.value)
                | (VirtualEnvironment.state != VEState.STOPPED.value),
            )
            .order_by(col(VirtualEnvironment.name))
        ).all()
    )


def _refuse_if_busy(ctx: ServiceContext, row: FilesystemImage, doing: str) -> None:
    users = _busy_users(ctx, row.id)
    if users:
        raise InUse(
            f"cannot {doing} filesystem image {row.name}: virtual environment {', '.join(users)} "
            "is using it (stop it first)"
        )


@contextmanager
def job_lock(ctx: ServiceContext, name: str) -> Iterator[None]:
    """One job on an image at a time (across every qrm process on this machine)."""
    directory = ctx.settings.data_dir / "locks"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(directory / f"fs-image-{name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUse(f"another job is working on filesystem image {name} right now") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _set(ctx: ServiceContext, name: str, **values: object) -> None:
    """Change an image's row in a short transaction of its own."""
    row = get_fs_image_row(ctx, name)
    for key, value in values.items():
        setattr(row, key, value)
    ctx.session.add(row)
    ctx.commit()


def _refuse_taken(ctx: ServiceContext, name: str) -> None:
    """A new image's name must be free (compared as names are)."""
    taken = ctx.session.exec(
        select(FilesystemImage.name).where(v.same_name(FilesystemImage.name, name))
    ).first()
    if taken:
        raise AlreadyExists(f"filesystem image {taken!r} already exists")


def _ready_image(
    name: str, storage_id: int, volume: VolumeInfo, size: int | None, source: str, comment: str
) -> FilesystemImage:
    """The row of an image made whole now from data that was elsewhere (a clone, an import)."""
    return FilesystemImage(
        name=name,
        storage_id=storage_id,
        location=volume.location,
        origin=ImageOrigin.IMPORTED.value,
        state=ImageState.READY.value,
        size_mb=volume.size_mb if volume.size_mb is not None else size,
        source=source[:255],
        source_at=utcnow(),
        comment=comment,
    )


def _keep_new_image(
    ctx: ServiceContext, row: FilesystemImage, message: str, driver: StorageDriver, where: StorageTarget
) -> None:
    """Record a new image whose volume is made (its row and an event, one commit);
    the volume goes again when the commit fails."""
    location = row.location
    ctx.session.add(row)
    ctx.record("filesystem-image", row.name, message)
    try:
        ctx.commit()
    except Exception:
        driver.remove_volume(where, location)
        raise


def _announce(ctx: ServiceContext, row: FilesystemImage) -> FilesystemImagePublic:
    """The new image as clients see it, told to the plugins."""
    result = public.filesystem_images(ctx.session, [row])[0]
    ctx.hooks.filesystem_image_added(result, ctx.hook_ctx)
    return result


# ---------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    source: capture.Source
    excludes: list[str]
    key: str = field(repr=False)
    host_key: str | None
    bwlimit: int | None = None
    #: Logs in with this instead of ``key`` (kept in memory for the job's life, never stored).
    password: str | None = field(default=None, repr=False)


def _credentials(identity: str | None, password: str | None) -> tuple[str, str | None]:
    """(the key, the password): one of the two logs in to the machine."""
    if password is not None:
        if identity is not None:
            raise InvalidInput("give either a key (identity) or a password to log in with, not both")
        return "", capture.check_password(password)
    if identity is None:
        raise InvalidInput("give the key (identity) or the password that logs in to the machine")
    return capture.check_key(identity), None


def check_bwlimit(value: int | None) -> int | None:
    return None if value is None else v.positive(value, "bandwidth limit (KB/s)", 1, 100_000_000)


def _source_text(source: capture.Source, excludes: Sequence[str]) -> str:
    text = str(source) + "".join(f" --exclude={e}" for e in excludes)
    if len(text) > 255:
        raise InvalidInput("the source and its --exclude patterns are too long to record (255 characters)")
    return text


def _parse_source_text(text: str) -> tuple[capture.Source, list[str]]:
    parts = text.split(" --exclude=")
    head, excludes = parts[0], parts[1:]
    port = None
    if " port " in head:
        head, _, number = head.partition(" port ")
        port = int(number)
    return capture.parse_source(head, port), excludes


def _run_job(
    ctx: ServiceContext,
    row_name: str,
    driver: StorageDriver,
    storage: StorageTarget,
    location: str,
    plan: _Plan,
    progress: ProgressFn | None,
    every: float,
) -> capture.Outcome:
    """open_tree, rsync, identity reset, close_tree; the progress into the row."""
    data_dir = ctx.settings.data_dir
    runner = storage_runner(ctx.settings, storage)
    tree = driver.open_tree(storage, location)
    known = capture.known_hosts_for(data_dir, plan.source, plan.host_key)
    last = [0.0]

    def report(p: capture.Progress) -> None:
        line = p.line()
        if progress is not None:
            progress(line)
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            _set(ctx, row_name, progress=f"capturing: {line}"[:255])

    outcome, known_after = capture.run_capture(
        runner, plan.source, tree, plan.key, known, plan.excludes, report=report, every=min(every, 1.0),
        bwlimit=plan.bwlimit, password=plan.password,
    )  # fmt: skip
    capture.save_known_hosts(data_dir, known_after)
    if not outcome.ok:
        return outcome
    done = runner.script(capture.reset_identity_script(tree), timeout=300)
    if "qrm-reset" not in done.stdout:
        return capture.Outcome(False, f"cannot reset the machine identity in {tree}: {done.last_error()}")
    if progress is not None:
        progress("making the image from the copied files")
    try:
        how = driver.close_tree(storage, location, tree)
    except DriverError as exc:
        return capture.Outcome(False, str(exc), progress=outcome.progress)
    return capture.Outcome(True, error=how, progress=outcome.progress, seconds=outcome.seconds,
                           vanished=outcome.vanished)  # fmt: skip


def start_capture(
    ctx: ServiceContext,
    *,
    name: str,
    storage: str,
    source: str,
    identity: str | None = None,
    host_key: str | None = None,
    port: int | None = None,
    excludes: Sequence[str] = (),
    size_mb: int | None = None,
    comment: str | None = None,
    progress: ProgressFn | None = None,
    password: str | None = None,
) -> FilesystemImagePublic:
    """The first half of a capture: everything checked, the login to the machine
    tried from where the rsync will run, then the volume made and the image
    recorded in state ``creating``. Refused (an unreachable machine, a refused
    key or password, a changed host key): one line, nothing made. :func:`run_capture`
    copies. The machine is logged in to with the key ``identity`` or with ``password``
    (never stored, logged or returned)."""
    name = v.name(name, "filesystem image name")
    comment = v.comment(comment)
    src = capture.parse_source(source, port)
    extra = capture.check_excludes(list(excludes))
    key, secret = _credentials(identity, password)
    pinned = capture.check_host_key(host_key) if host_key is not None else None
    size = DEFAULT_CAPTURE_MB if size_mb is None else v.positive(size_mb, "size (MB)", 1, 2**31 - 1)
    recorded_source = _source_text(src, extra)
    storage_row = get_storage_row(ctx, storage)
    assert storage_row.id is not None
    storage_id = storage_row.id
    driver = driver_for(ctx, storage_row)
    where = target(storage_row)
    _needs(driver, where, "open_tree", "close_tree")
    _refuse_taken(ctx, name)
    ctx.rollback()  # no transaction stays open while the machines are reached
    with job_lock(ctx, name):
        if progress is not None:
            progress(f"logging in to {src}")
        problem, known_after = capture.check_login(
            storage_runner(ctx.settings, where),
            src,
            key,
            capture.known_hosts_for(ctx.settings.data_dir, src, pinned),
            secrets=[key] if key else [],
            password=secret,
        )
        if problem is not None:
            raise DriverError(problem)
        capture.save_known_hosts(ctx.settings.data_dir, known_after)
        volume = driver.create_volume(where, name, size)
        row = FilesystemImage(
            name=name,
            storage_id=storage_id,
            location=volume.location,
            origin=ImageOrigin.CAPTURED.value,
            state=ImageState.CREATING.value,
            size_mb=volume.size_mb,
            source=recorded_source,
            progress="capturing: starting",
            comment=comment,
        )
        _keep_new_image(
            ctx,
            row,
            f"filesystem image {name}: capture of {src} started ({size} MB on {storage_row.name}:{volume.location})",
            driver,
            where,
        )
    return public.filesystem_images(ctx.session, [row])[0]


def run_capture(
    ctx: ServiceContext,
    name: str,
    *,
    identity: str | None = None,
    host_key: str | None = None,
    progress: ProgressFn | None = None,
    every: float = 2.0,
    bwlimit: int | None = None,
    password: str | None = None,
) -> FilesystemImagePublic:
    """Copy the machine an image records as its source into it (the second half of a
    capture, or a resume: only what is missing or changed is copied)."""
    key, secret = _credentials(identity, password)
    pinned = capture.check_host_key(host_key) if host_key is not None else None
    row, storage_row = _image_and_storage(ctx, name)
    if row.origin != ImageOrigin.CAPTURED.value or not row.source:
        raise InvalidInput(f"filesystem image {name} was not captured from a machine ({row.origin})")
    _refuse_if_busy(ctx, row, "capture into")
    src, extra = _parse_source_text(row.source)
    driver = driver_for(ctx, storage_row)
    where = target(storage_row)
    _needs(driver, where, "open_tree", "close_tree")
    location, state = row.location, row.state
    ctx.rollback()  # ``row`` is expired now: reading it again would open a transaction
    with job_lock(ctx, name):
        if state != ImageState.CREATING.value:
            _set(ctx, name, state=ImageState.CREATING.value, progress="capturing: resuming")
            ctx.record("filesystem-image", name, f"filesystem image {name}: capture of {src} resumed")
            ctx.commit()
        plan = _Plan(src, extra, key, pinned, check_bwlimit(bwlimit), password=secret)
        return _finish_capture(ctx, name, driver, where, location, plan, progress, every)


def capture_in_background(
    settings: Settings,
    plugins: PluginSystem,
    actor: str,
    name: str,
    *,
    identity: str | None = None,
    host_key: str | None = None,
    bwlimit: int | None = None,
    password: str | None = None,
) -> threading.Thread:
    """The copying half of a capture (:func:`run_capture`) in a thread of the
    server (API, console): its progress goes into the image's row, its outcome
    into the events. The key or password lives in this thread's memory only, for
    the job's life: it is never written to the database."""
    from qrm_core.services import service_context

    def job() -> None:
        try:
            with service_context(settings, actor=actor, plugins=plugins, check_schema=False) as ctx:
                run_capture(
                    ctx, name, identity=identity, host_key=host_key, bwlimit=bwlimit, password=password
                )
        except Exception as exc:  # noqa: BLE001 - recorded as an event by run_capture
            logging.getLogger("qrm.images").warning("capture of %s ended: %s", name, exc)

    thread = threading.Thread(target=job, name=f"capture-{name}", daemon=True)
    thread.start()
    return thread


def capture_filesystem_image(
    ctx: ServiceContext,
    *,
    name: str,
    storage: str,
    source: str,
    identity: str | None = None,
    host_key: str | None = None,
    port: int | None = None,
    excludes: Sequence[str] = (),
    size_mb: int | None = None,
    comment: str | None = None,
    progress: ProgressFn | None = None,
    every: float = 2.0,
    bwlimit: int | None = None,
    password: str | None = None,
) -> FilesystemImagePublic:
    """Capture a running machine (``root@10.0.11.172:/``) into a new image on ``storage``:
    :func:`start_capture` then :func:`run_capture`. A capture that is interrupted
    leaves the image in state ``error`` with what was copied (run it again to go
    on); one that cannot succeed (the volume too small) removes what it made."""
    check_bwlimit(bwlimit)
    start_capture(
        ctx, name=name, storage=storage, source=source, identity=identity, host_key=host_key, port=port,
        excludes=excludes, size_mb=size_mb, comment=comment, progress=progress, password=password,
    )  # fmt: skip
    return run_capture(
        ctx, name, identity=identity, host_key=host_key, progress=progress, every=every, bwlimit=bwlimit,
        password=password,
    )  # fmt: skip


def _finish_capture(
    ctx: ServiceContext,
    name: str,
    driver: StorageDriver,
    where: StorageTarget,
    location: str,
    plan: _Plan,
    progress: ProgressFn | None,
    every: float,
) -> FilesystemImagePublic:
    try:
        outcome = _run_job(ctx, name, driver, where, location, plan, progress, every)
    except BaseException as exc:  # Ctrl-C, a lost database, a driver failure
        ctx.rollback()
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)[:150]
        _set(ctx, name, state=ImageState.ERROR.value,
             progress=f"capture interrupted ({why}); resume with qrm filesystem-image capture {name}"[:255])  # fmt: skip
        ctx.record("filesystem-image", name, f"filesystem image {name}: capture interrupted ({why})",
                   EventLevel.WARNING)  # fmt: skip
        ctx.commit()
        raise
    if outcome.ok:
        p = outcome.progress
        copied = f"{capture.human_bytes(p.bytes)}, {p.files:,} files" if p else ""
        _set(ctx, name, state=ImageState.READY.value, progress="", source_at=utcnow())
        ctx.record(
            "filesystem-image",
            name,
            f"filesystem image {name} captured from {plan.source} in {outcome.seconds:.0f} s ({copied}; "
            f"{outcome.error}; machine identity reset"
            + ("; some files vanished while copying" if outcome.vanished else "")
            + ")",
        )
        ctx.commit()
        return public.filesystem_images(ctx.session, [get_fs_image_row(ctx, name)])[0]
    if outcome.resumable:
        _set(ctx, name, state=ImageState.ERROR.value,
             progress=f"{outcome.error}; resume with qrm filesystem-image capture {name}"[:255])  # fmt: skip
        ctx.record("filesystem-image", name, f"filesystem image {name}: {outcome.error}", EventLevel.WARNING)
        ctx.commit()
        raise DriverError(
            f"capture of {name}: {outcome.error}; run 'qrm filesystem-image capture {name}' to go on"
        )
    # It cannot succeed as it is: nothing half-made stays.
    try:
        driver.remove_volume(where, location)
    except QrmError:
        pass
    row = get_fs_image_row(ctx, name)
    ctx.session.delete(row)
    ctx.record("filesystem-image", name, f"filesystem image {name}: capture failed ({outcome.error}); removed",
               EventLevel.ERROR)  # fmt: skip
    ctx.commit()
    raise DriverError(f"capture of {name} failed: {outcome.error}")


# ---------------------------------------------------------------------------
# Clone, snapshots, revert
# ---------------------------------------------------------------------------


def clone_filesystem_image(
    ctx: ServiceContext,
    source: str,
    *,
    name: str,
    storage: str | None = None,
    comment: str | None = None,
    progress: ProgressFn | None = None,
) -> FilesystemImagePublic:
    """A new image ``name`` with a copy of ``source``'s data: on the same storage server
    by the driver (copy-on-write where the backend can; the event says how it was
    done), or onto another storage server ``storage`` (any type that fills volumes
    with files) by copying the files through this machine (:func:`_clone_across`)."""
    name = v.name(name, "filesystem image name")
    comment = v.comment(comment)
    row, storage_row = _image_and_storage(ctx, source)
    dest_row = storage_row
    if storage is not None and storage != storage_row.name:
        dest_row = get_storage_row(ctx, storage)
    if row.state != ImageState.READY.value:
        raise InvalidInput(f"filesystem image {source} is not ready ({row.state}): nothing to clone yet")
    _refuse_taken(ctx, name)
    _refuse_if_busy(ctx, row, "clone")
    driver = driver_for(ctx, storage_row)
    where = target(storage_row)
    if dest_row is not storage_row:
        return _clone_across(ctx, row, storage_row, dest_row, name, comment, progress)
    _needs(driver, where, "clone_volume")
    assert storage_row.id is not None
    storage_id, location, size, src_name = storage_row.id, row.location, row.size_mb, row.name
    ctx.rollback()
    with job_lock(ctx, source):
        volume = driver.clone_volume(where, location, name)
        new = _ready_image(name, storage_id, volume, size, f"clone of {src_name}", comment)
        _keep_new_image(
            ctx,
            new,
            f"filesystem image {name} cloned from {src_name} ({volume.how or 'copied'}; {storage_row.name}:{volume.location})",
            driver,
            where,
        )
    return _announce(ctx, new)


def _clone_across(
    ctx: ServiceContext,
    row: FilesystemImage,
    source_row: StorageServer,
    dest_row: StorageServer,
    name: str,
    comment: str,
    progress: ProgressFn | None,
) -> FilesystemImagePublic:
    """Clone onto another storage server: a volume of the source's size made there, the
    source's files (``read_tree``) copied into it (``open_tree``) as a tar stream through
    this machine, then made the volume's data (``close_tree``). The source's driver is
    told when its files have been read (``release_tree``), whether the copy worked or
    not. Nothing is left on the other server when it fails; no transaction is open
    while the servers work."""
    from qrm_core.remote import copy_tree

    src_driver, src_where = driver_for(ctx, source_row), target(source_row)
    dst_driver, dst_where = driver_for(ctx, dest_row), target(dest_row)
    _needs(src_driver, src_where, "read_tree")
    _needs(dst_driver, dst_where, "open_tree", "close_tree")
    assert dest_row.id is not None
    dest_id, dest_name, src_name, location = dest_row.id, dest_row.name, row.name, row.location
    from_name = source_row.name
    size = row.size_mb if row.size_mb is not None else DEFAULT_CAPTURE_MB
    ctx.rollback()
    row_made = False

    def say(line: str) -> None:
        """Tell the caller, and keep the line on the new image's row once it has one, so
        that ``show``, the console and a remote client see it (copy_tree reports at most
        once a second)."""
        if progress is not None:
            progress(line)
        if row_made:
            _set(ctx, name, progress=f"cloning: {line}"[:255])

    with job_lock(ctx, src_name), job_lock(ctx, name):
        started = time.monotonic()
        src_runner, dst_runner = (
            storage_runner(ctx.settings, src_where),
            storage_runner(ctx.settings, dst_where),
        )
        src_tree = src_driver.read_tree(src_where, location)
        try:
            counted = src_runner.script(
                f"du -sb -- {shell_quote(src_tree)} 2>/dev/null | cut -f1\n"
            ).stdout.strip()
            total = int(counted) if counted.isdigit() else 0
            say(f"making a {size} MB volume on {dest_name}")
            volume = dst_driver.create_volume(dst_where, name, size)
            # The image exists from now on, as a capture's does: state creating, its progress
            # on the row (list, show, a remote client, the console), removed if the copy fails.
            new = _ready_image(name, dest_id, volume, size, f"clone of {src_name}", comment)
            new.state, new.source_at = ImageState.CREATING.value, None
            new.progress = f"cloning: copying {src_name} from {from_name}"
            _keep_new_image(ctx, new, f"filesystem image {name}: clone of {src_name} from {from_name} started "
                            f"({size} MB on {dest_name}:{volume.location})", dst_driver, dst_where)  # fmt: skip
            row_made = True
            try:
                tree = dst_driver.open_tree(dst_where, volume.location)

                def report(copied: int, seconds: float) -> None:
                    rate = copied / seconds if seconds > 0 else 0.0
                    line = f"{capture.human_bytes(copied)}"
                    if total:
                        line += f" of {capture.human_bytes(total)} ({min(100, copied * 100 // total)}%)"
                    line += f", {capture.human_bytes(rate)}/s"
                    if total and rate > 0 and copied < total:
                        line += f", ETA {int((total - copied) / rate)} s"
                    say(f"copying {src_name} to {dest_name}: {line}")

                say(f"copying {src_name} from {from_name} to {dest_name}")
                copied = copy_tree(src_runner, src_tree, dst_runner, tree, report=report)
                say(f"copied {capture.human_bytes(copied)} in {time.monotonic() - started:.0f} s")
                say("making the image from the copied files")
                how = dst_driver.close_tree(dst_where, volume.location, tree)
            except BaseException as exc:
                with contextlib.suppress(QrmError):
                    dst_driver.remove_volume(dst_where, volume.location)
                _forget_clone(ctx, name, src_name, exc)
                raise
        finally:
            # Done with the source's files, whatever happened; a failing copy's own error
            # is the one raised (a tree that could not be released is logged).
            unreleased = _release_tree(src_driver, src_where, location, src_tree)
        if unreleased:  # the clone is made: say so in its events
            ctx.record("filesystem-image", src_name, unreleased, EventLevel.WARNING)
        took = time.monotonic() - started
        new = get_fs_image_row(ctx, name)
        new.state, new.progress, new.source_at = ImageState.READY.value, "", utcnow()
        ctx.session.add(new)
        ctx.record("filesystem-image", name,
                   f"filesystem image {name} cloned from {src_name} on {from_name} in {took:.0f} s "
                   f"(files copied through this machine, {capture.human_bytes(copied)}; {how}; {dest_name}:{volume.location})")  # fmt: skip
        ctx.commit()
    return _announce(ctx, new)


def _forget_clone(ctx: ServiceContext, name: str, src_name: str, exc: BaseException) -> None:
    """The row of a clone whose copy failed goes (its volume is gone already), with an event."""
    ctx.rollback()
    row = ctx.session.exec(select(FilesystemImage).where(FilesystemImage.name == name)).first()
    if row is None:
        return
    reason = exc.message if isinstance(exc, QrmError) else type(exc).__name__
    ctx.session.delete(row)
    ctx.record("filesystem-image", name,
               f"filesystem image {name}: clone of {src_name} failed, nothing kept: {reason}"[:1000],
               EventLevel.ERROR)  # fmt: skip
    ctx.commit()


def _release_tree(driver: StorageDriver, where: StorageTarget, location: str, tree: str) -> str | None:
    """Tell the source's driver that core has finished reading ``tree`` (``release_tree``:
    e.g. unmount what read_tree mounted). None when done; else what went wrong, in one
    line (logged too): the copy's outcome stands either way."""
    try:
        driver.release_tree(where, location, tree)
    except QrmError as exc:
        said = f"the files of volume {location} on {where.name} read for a clone were not released: {exc}"
        logging.getLogger("qrm.images").warning("%s", said)
        return said
    return None


def snapshot_filesystem_image(
    ctx: ServiceContext, name: str, *, label: str | None = None
) -> ImageSnapshotPublic:
    """Keep the image's data as it is now under ``label`` (default: the time, UTC)."""
    label = check_label(label) if label is not None else utcnow().strftime("%Y%m%dT%H%M%SZ")
    row, storage_row = _image_and_storage(ctx, name)
    if row.state != ImageState.READY.value:
        raise InvalidInput(f"filesystem image {name} is not ready ({row.state})")
    driver = driver_for(ctx, storage_row)
    where = target(storage_row)
    _needs(driver, where, "snapshot_volume")
    location = row.location
    ctx.rollback()
    with job_lock(ctx, name):
        how = driver.snapshot_volume(where, location, label)
    ctx.record("filesystem-image", name, f"filesystem image {name}: snapshot {label} taken ({how or 'done'})")
    ctx.commit()
    return ImageSnapshotPublic(image=name, label=label, how=how or "")


def list_image_snapshots(ctx: ServiceContext, name: str) -> list[ImageSnapshotPublic]:
    row, storage_row = _image_and_storage(ctx, name)
    driver = driver_for(ctx, storage_row)
    where = target(storage_row)
    _needs(driver, where, "list_snapshots")
    location = row.location
    ctx.rollback()
    return [ImageSnapshotPublic(image=name, label=label) for label in driver.list_snapshots(where, location)]


def remove_image_snapshot(ctx: ServiceContext, name: str, label: str) -> ImageSnapshotPublic:
    check_label(label)
    row, storage_row = _image_and_storage(ctx, name)
    if label == PRISTINE_LABEL:
        pristine = ctx.session.exec(
            select(VirtualEnvironment.name).where(
                VirtualEnvironment.fs_image_id == row.id, col(VirtualEnvironment.pristine).is_(True)
            )
        ).first()
        if pristine:
            raise InUse(f"snapshot {label} of {name} is what virtual environment {pristine} resets to")
    driver = driver_for(ctx, storage_row)
    where = target(storage_row)
    _needs(driver, where, "remove_snapshot")
    location = row.location
    ctx.rollback()
    with job_lock(ctx, name):
        driver.remove_snapshot(where, location, label)
    ctx.record("filesystem-image", name, f"filesystem image {name}: snapshot {label} removed")
    ctx.commit()
    return ImageSnapshotPublic(image=name, label=label)


def revert_filesystem_image(ctx: ServiceContext, name: str, *, label: str) -> ImageSnapshotPublic:
    """Put the image's data back as it was at snapshot ``label``. Refused while a VE
    that uses the image runs (one line naming it)."""
    check_label(label)
    row, storage_row = _image_and_storage(ctx, name)
    _refuse_if_busy(ctx, row, "revert")
    driver = driver_for(ctx, storage_row)
    where = target(storage_row)
    _needs(driver, where, "revert_volume")
    location = row.location
    ctx.rollback()
    with job_lock(ctx, name):
        started = time.monotonic()
        how = driver.revert_volume(where, location, label)
        took = time.monotonic() - started
    ctx.record(
        "filesystem-image",
        name,
        f"filesystem image {name} reverted to {label} in {took:.1f} s ({how or 'done'})",
    )
    ctx.commit()
    return ImageSnapshotPublic(image=name, label=label, how=how or "")


# ---------------------------------------------------------------------------
# Pristine VEs
# ---------------------------------------------------------------------------


def check_pristine_possible(ctx: ServiceContext, fs_row: FilesystemImage) -> None:
    """A VE kept pristine needs storage that snapshots and reverts."""
    storage_row = ctx.session.get(StorageServer, fs_row.storage_id)
    assert storage_row is not None
    _needs(
        driver_for(ctx, storage_row),
        target(storage_row),
        "snapshot_volume",
        "list_snapshots",
        "revert_volume",
    )


def keep_pristine(ctx: ServiceContext, ve_name: str) -> str | None:
    """Before a pristine VE's first start: snapshot its image as it is
    (:data:`PRISTINE_LABEL`), once. Returns how, or None when there was one already."""
    ve = ctx.session.exec(select(VirtualEnvironment).where(VirtualEnvironment.name == ve_name)).first()
    if ve is None or not ve.pristine:
        return None
    fs = ctx.session.get(FilesystemImage, ve.fs_image_id)
    assert fs is not None
    storage_row = ctx.session.get(StorageServer, fs.storage_id)
    assert storage_row is not None
    driver, where, location, fs_name = driver_for(ctx, storage_row), target(storage_row), fs.location, fs.name
    ctx.rollback()
    if PRISTINE_LABEL in driver.list_snapshots(where, location):
        return None
    how = driver.snapshot_volume(where, location, PRISTINE_LABEL)
    ctx.record("filesystem-image", fs_name,
               f"filesystem image {fs_name}: kept as {ve_name} first starts (snapshot {PRISTINE_LABEL}, {how or 'done'})")  # fmt: skip
    ctx.commit()
    return how or "done"


#: ``VirtualEnvironment.reset_phase`` of a running VE being reset.
RESET_REBOOTING = "rebooting"
RESET_REVERTING = "reverting"
#: How a VE's problem starts when its reset failed (kept while it is stopped).
RESET_FAILED = "reset failed: "


def reset_ve(
    ctx: ServiceContext,
    name: str,
    *,
    timeout: float = 600.0,
    poll: float = 0.5,
    progress: ProgressFn | None = None,
) -> VirtualEnvironmentPublic:
    """Give a pristine VE back what it started with: revert its image to the
    snapshot of its first start.

    A running VE keeps its machines: each is told to reboot (``reset_phase``
    "rebooting"), and its agent, booting into the VE again, registers from the
    initrd before it mounts the root and is held there (the registration's
    ``hold``) while the VE resets. Once every machine registered so (its old OS is
    down: nothing writes into the image any more), the image is reverted
    ("reverting") and the hold lifted: the machines boot straight into the reverted
    image, one boot, not a stop into idle and a start. A machine that does not come
    back within ``timeout``, or a revert that fails, ends the reset: the VE is
    stopped (its machines released), its problem and an event say why, and the
    command fails with that line. A VE that was stopped stays stopped, reverted.
    Run again on a VE whose reset was interrupted (a server restart), it goes on
    where it was."""
    from qrm_core.services import virtual_environments as ves

    row = ves.get_ve_row(ctx, name)
    if not row.pristine:
        raise InvalidInput(
            f"virtual environment {name} is not kept pristine (create it with --pristine, or 'qrm ve set {name} --pristine' before its first start)"
        )
    fs = ctx.session.get(FilesystemImage, row.fs_image_id)
    assert fs is not None
    storage_row = ctx.session.get(StorageServer, fs.storage_id)
    assert storage_row is not None
    driver, where, location, fs_name = driver_for(ctx, storage_row), target(storage_row), fs.location, fs.name
    was_running = row.desired_state == VEDesiredState.RUNNING.value
    resuming = bool(row.reset_phase)
    others = [u for u in _busy_users(ctx, fs.id) if u != name]
    if others:
        raise InUse(f"cannot reset {name}: its image {fs_name} is also used by {', '.join(others)}")
    ctx.rollback()
    if PRISTINE_LABEL not in driver.list_snapshots(where, location):
        raise InvalidInput(f"virtual environment {name} has not started yet: there is nothing to go back to")
    started = time.monotonic()
    deadline = started + timeout
    if was_running:
        if not resuming:
            _order_reset_reboots(ctx, name)
        if progress is not None:
            progress(f"{name}: its machines reboot; each holds its boot until the image is reverted")
        _wait_machines_down(ctx, name, deadline, timeout, poll, progress)
        _start_reverting(ctx, name)
    else:
        _wait_stopped(ctx, name, deadline, timeout, poll)
    if progress is not None:
        progress(f"reverting {fs_name} to what {name} started with")
    try:
        with job_lock(ctx, fs_name):
            how = driver.revert_volume(where, location, PRISTINE_LABEL)
    except QrmError as exc:
        ctx.rollback()
        if not was_running:
            raise
        _reset_failed(
            ctx,
            name,
            f"reverting {fs_name} failed: {exc.message} (the image is as the failed revert left it)",
        )
        raise DriverError(f"reset of {name} failed: reverting {fs_name} failed: {exc.message}") from None
    ctx.rollback()
    row = ves._locked_ve(ctx, name)
    boots_on = was_running and row.reset_phase == RESET_REVERTING
    if row.reset_phase:
        row.reset_phase = ""
        if row.problem.startswith("resetting"):
            row.problem = ""
        row.updated_at = utcnow()
        ctx.session.add(row)
    ctx.record(
        "ve",
        name,
        f"virtual environment {name} reset: {fs_name} reverted to its first start ({how or 'done'})"
        + ("; its machines boot on into it" if boots_on else ""),
    )
    ctx.commit()
    result = ves.show_ve(ctx, name)
    if progress is not None:
        progress(f"reset of {name} done in {time.monotonic() - started:.1f} s ({result.state})")
    return result


def _order_reset_reboots(ctx: ServiceContext, name: str) -> None:
    """In one transaction: every machine of the VE is told to reboot (it stays the VE's;
    its boot is held until the image is reverted), the VE shows it is resetting."""
    from qrm_core.services import virtual_environments as ves
    from qrm_core.services.agent import release
    from qrm_core.services.resources import transition

    row = ves._locked_ve(ctx, name)
    members = ctx.session.exec(
        select(Resource).where(Resource.ve_id == row.id).order_by(col(Resource.id)).with_for_update()
    ).all()
    for member in members:
        label = public.resource_label(member)
        if member.state in (
            ResourceState.ASSIGNED.value,
            ResourceState.BOOTING.value,
            ResourceState.ACTIVE.value,
        ):
            if member.state == ResourceState.ACTIVE.value:
                transition(
                    ctx,
                    member,
                    ResourceState.BOOTING,
                    f"{name} is resetting: rebooting into its reverted image",
                )
            member.boot_generation += 1
            ctx.session.add(member)
            ctx.record("resource", label, f"reboot ordered: {name} is resetting")
        else:  # silent or paused: no boot to hold; it comes back idle
            release(ctx, member, f"{name} is resetting", reboot=True)
    row.reset_phase = RESET_REBOOTING
    row.state = VEState.STARTING.value
    row.problem = "resetting: waiting for its machines to reboot"
    row.updated_at = utcnow()
    ctx.session.add(row)
    ctx.record(
        "ve",
        name,
        f"virtual environment {name} reset requested: its machines reboot, held until its image is reverted",
    )
    ctx.commit()


def _start_reverting(ctx: ServiceContext, name: str) -> None:
    """ "rebooting" -> "reverting", as one conditional UPDATE: of two resets of one VE
    at once (a second ``qrm ve reset`` goes on with an interrupted one), one reverts."""
    table = VirtualEnvironment.__table__  # type: ignore[attr-defined]
    done = ctx.session.connection().execute(
        sa.update(table)
        .where(table.c.name == name, table.c.reset_phase == RESET_REBOOTING)
        .values(reset_phase=RESET_REVERTING, problem="resetting: reverting its image", updated_at=utcnow())
    )
    ctx.commit()
    if done.rowcount != 1:
        raise Conflict(f"reset of {name}: another request of the same reset reverts its image")


def _wait_machines_down(
    ctx: ServiceContext,
    name: str,
    deadline: float,
    timeout: float,
    poll: float,
    progress: ProgressFn | None,
) -> None:
    """Until every machine of the VE has registered in the boot it was told to make
    (from the initrd: its old OS is down, and it holds its boot). No transaction
    stays open meanwhile; the VE's problem counts the machines down."""
    from qrm_core.services import virtual_environments as ves

    said = ""
    while True:
        row = ves.get_ve_row(ctx, name)
        if row.desired_state != VEDesiredState.RUNNING.value:
            ctx.rollback()
            raise Conflict(
                f"reset of {name} interrupted: it was stopped meanwhile; nothing was reverted "
                f"('qrm ve reset {name}' reverts it once it is stopped)"
            )
        if row.reset_phase != RESET_REBOOTING:
            ctx.rollback()
            raise Conflict(f"reset of {name}: another request of the same reset reverts its image")
        members = ctx.session.exec(
            select(Resource).where(Resource.ve_id == row.id).order_by(col(Resource.id))
        ).all()
        waiting = [public.resource_label(m) for m in members if m.booted_generation < m.boot_generation]
        if not waiting:
            ctx.rollback()
            return
        lost = [
            public.resource_label(m)
            for m in members
            if m.booted_generation < m.boot_generation and m.state == ResourceState.ERROR.value
        ]
        if lost:  # the engine gave up on it (the boot timeout); a failover VE gets another
            reason = (
                f"{', '.join(lost)} did not come back from the reboot "
                f"(boot timeout {ctx.settings.boot_timeout:g} s); nothing was reverted"
            )
            _reset_failed(ctx, name, reason)
            raise DriverError(f"reset of {name} failed: {reason}")
        problem = f"resetting: waiting for its machines to reboot ({len(members) - len(waiting)} of {len(members)} down)"
        if row.problem != problem:
            row.problem = problem
            ctx.session.add(row)
            ctx.commit()
        else:
            ctx.rollback()  # no transaction stays open while the machines reboot
        if progress is not None and problem != said:
            progress(f"{name}: {problem}")
            said = problem
        if time.monotonic() > deadline:
            reason = f"{', '.join(waiting)} did not reboot within {timeout:g} s; nothing was reverted"
            _reset_failed(ctx, name, reason)
            raise DriverError(f"reset of {name} failed: {reason}")
        time.sleep(poll)


def _wait_stopped(ctx: ServiceContext, name: str, deadline: float, timeout: float, poll: float) -> None:
    """A VE asked to stop whose machines still run it: wait until they are down."""
    from qrm_core.services import virtual_environments as ves

    while True:
        state = ves.get_ve_row(ctx, name).state
        ctx.rollback()  # no transaction stays open while the engine works
        if state == VEState.STOPPED.value:
            return
        if time.monotonic() > deadline:
            raise DriverError(
                f"{name} did not stop within {timeout:g} s (it is {state}); nothing was reverted"
            )
        time.sleep(poll)


def _reset_failed(ctx: ServiceContext, name: str, reason: str) -> None:
    """A reset that cannot finish: the VE stops (its machines, held or not, reboot
    into idle and are released), its problem says why, an event records it."""
    from qrm_core.services import virtual_environments as ves

    ctx.rollback()
    ves.stop_ve(ctx, name)  # clears the reset phase
    row = ves._locked_ve(ctx, name)
    row.problem = f"{RESET_FAILED}{reason}"[:1024]
    ctx.session.add(row)
    ctx.record(
        "ve",
        name,
        f"reset of virtual environment {name} failed: {reason}; it was stopped, its machines released"[:1000],
        EventLevel.ERROR,
    )
    ctx.commit()


def wait_reset_active(
    ctx: ServiceContext, name: str, *, timeout: float, poll: float = 0.5
) -> VirtualEnvironmentPublic:
    """Wait until the VE runs again (for ``qrm ve reset --wait``)."""
    from qrm_core.services import virtual_environments as ves

    deadline = time.monotonic() + timeout
    while True:
        row = ves.get_ve_row(ctx, name)
        state, problem = row.state, row.problem
        if state == VEState.RUNNING.value:
            return ves.show_ve(ctx, name)
        ctx.rollback()  # no transaction stays open while the engine works
        if time.monotonic() > deadline:
            raise DriverError(
                f"{name} is not active again within {timeout:g} s ({state}: {problem or 'waiting'})"
            )
        time.sleep(poll)


# ---------------------------------------------------------------------------
# Import of root filesystem archives
# ---------------------------------------------------------------------------


def import_filesystem_image(
    ctx: ServiceContext,
    *,
    name: str,
    storage: str,
    archive: str,
    sha256: str | None = None,
    size_mb: int | None = None,
    comment: str | None = None,
    progress: ProgressFn | None = None,
) -> FilesystemImagePublic:
    """A new image from a root filesystem archive (a file here, or an http(s) URL):
    its checksum verified, every entry checked (:func:`qrm_core.archive.check_archive`),
    unpacked on the storage server into the volume (owners as numbers, modes,
    extended attributes). Refused or failed: one line, nothing left behind."""
    import tempfile
    from pathlib import Path

    from qrm_core import archive as archives

    name = v.name(name, "filesystem image name")
    comment = v.comment(comment)
    wanted_sum = archives.check_sha256(sha256)
    if size_mb is not None:
        v.positive(size_mb, "size (MB)", 1, 2**31 - 1)
    is_url = archive.startswith(("http://", "https://"))
    if is_url:
        archives.check_url(archive)
    else:
        local = Path(archive).expanduser()
        if not local.is_file():
            raise InvalidInput(f"{archive} is not a file here (give a file, or an http(s) URL)")
    storage_row = get_storage_row(ctx, storage)
    assert storage_row.id is not None
    storage_id, storage_name = storage_row.id, storage_row.name
    driver = driver_for(ctx, storage_row)
    where = target(storage_row)
    _needs(driver, where, "open_tree", "close_tree")
    _refuse_taken(ctx, name)
    ctx.rollback()
    work_parent = ctx.settings.data_dir / "tmp"
    work_parent.mkdir(parents=True, exist_ok=True)
    with job_lock(ctx, name), tempfile.TemporaryDirectory(prefix="import-", dir=work_parent) as tmp:
        if is_url:
            local = Path(tmp) / "archive"
            archives.download(archive, local, progress)
        if progress is not None:
            progress("verifying the archive")
        digest = archives.sha256_of(local)
        if wanted_sum is not None and digest != wanted_sum:
            raise InvalidInput(f"the archive's sha256 is {digest}, not {wanted_sum}: refused")
        info = archives.check_archive(local)
        needed = -(-info.bytes * 12 // 10 // (1 << 20)) + 64  # the files, ext4's overhead, room to boot
        size = size_mb if size_mb is not None else max(needed, 256)
        if size * (1 << 20) < info.bytes:
            raise InvalidInput(f"the archive holds {info.bytes / 1e6:.0f} MB of files: more than {size} MB")
        volume = driver.create_volume(where, name, size)
        try:
            how = _unpack(ctx, driver, where, volume.location, local, info, progress)
        except BaseException:
            with contextlib.suppress(QrmError):
                driver.remove_volume(where, volume.location)
            raise
        label = archive if is_url else Path(archive).name
        row = _ready_image(name, storage_id, volume, None, label, comment)
        _keep_new_image(
            ctx,
            row,
            f"filesystem image {name} imported from {label[:120]} (sha256 {digest[:16]}..., {info.entries} entries, "
            f"{info.bytes / 1e6:.0f} MB, {info.compression}; {how}; {size} MB on {storage_name}:{volume.location})",
            driver,
            where,
        )
    return _announce(ctx, row)


def _unpack(
    ctx: ServiceContext,
    driver: StorageDriver,
    where: StorageTarget,
    location: str,
    local: Path,
    info: ArchiveInfo,
    progress: ProgressFn | None,
) -> str:
    """Unpack a checked archive into a volume on the storage server; how close_tree said it went."""
    runner = storage_runner(ctx.settings, where)
    tree = driver.open_tree(where, location)
    made = runner.script("mktemp /var/tmp/qrm-import.XXXXXXXX\n")
    remote_file = made.stdout.strip()
    if not made.ok or not re.match(r"^/var/tmp/qrm-import\.[A-Za-z0-9]{8}$", remote_file):
        raise DriverError(f"cannot make a temporary file on {runner.where}: {made.last_error()}")
    try:
        if progress is not None:
            progress(f"copying the archive to {runner.where}")
        runner.upload(local, remote_file)
        if progress is not None:
            progress(f"unpacking {info.entries:,} entries ({info.bytes / 1e6:.0f} MB)")
        done = runner.script(
            f"tar --numeric-owner --xattrs --xattrs-include='*' -xpf {shell_quote(remote_file)} "
            f"-C {shell_quote(tree)} 2>&1 | tail -n 3\n",
            timeout=6 * 3600,
        )
        if done.stdout.strip():
            raise DriverError(f"unpacking on {runner.where} failed: {done.stdout.strip().splitlines()[-1]}")
    finally:
        runner.script(f"rm -f -- {shell_quote(remote_file)}\n")
    return driver.close_tree(where, location, tree)


# ---------------------------------------------------------------------------
# Auto-create: filled on the first start of a VE that uses it
# ---------------------------------------------------------------------------

AUTO_WAITING = "waiting for the first start of a virtual environment that uses it"


def add_auto_image(
    ctx: ServiceContext,
    *,
    name: str,
    storage: str,
    fill_from: str,
    size_mb: int,
    sha256: str | None = None,
    comment: str | None = None,
) -> FilesystemImagePublic:
    """An empty image (its volume made now, so its export is ready) that is filled
    when a VE that uses it first starts, from ``fill_from``: another image on the
    same storage server (copied as ``clone`` does), a root filesystem archive
    (a file on this machine or an http(s) URL, checked as ``import`` does), or the
    local disk of the machine that boots it (``local-disk[:/dev/DEVICE]``, see
    :mod:`qrm_core.services.local_fill`; that machine is the one placed). Until
    it is filled the engine places no machine into its VEs: nothing mounts a
    half-made image."""
    from pathlib import Path

    from qrm_core import archive as archives

    name = v.name(name, "filesystem image name")
    comment = v.comment(comment)
    v.positive(size_mb, "size (MB)", 1, 2**31 - 1)
    wanted_sum = archives.check_sha256(sha256)
    storage_row = get_storage_row(ctx, storage)
    assert storage_row.id is not None
    storage_id = storage_row.id
    driver = driver_for(ctx, storage_row)
    where = target(storage_row)
    source = (fill_from or "").strip()
    waiting = AUTO_WAITING
    local_disk = local_fill.parse_source(source)
    if local_disk is not None:
        if driver.copies_per_machine:
            raise InvalidInput(
                f"storage {storage_row.name} ({storage_row.type}) gives each machine a copy of its own: "
                "a machine's local disk can fill only a volume it mounts read-write from the server (nfs, iscsi)"
            )
        if wanted_sum is not None:
            raise InvalidInput("--sha256 is for archives, not a local disk")
        recorded, waiting = local_disk, local_fill.WAITING_FOR_MACHINE
    elif source.startswith(("http://", "https://")):
        archives.check_url(source)
        recorded = f"archive {source}"
        _needs(driver, where, "open_tree", "close_tree")
    elif "/" in source:
        if not Path(source).expanduser().is_file():
            raise InvalidInput(f"{source} is not a file here (give an image, a file or an http(s) URL)")
        recorded = f"archive {Path(source).expanduser().resolve()}"
        _needs(driver, where, "open_tree", "close_tree")
    else:
        other = ctx.session.exec(select(FilesystemImage).where(FilesystemImage.name == source)).first()
        if other is None:
            raise NotFound(f"filesystem image {source!r} (to fill {name} from) does not exist")
        if other.storage_id != storage_id:
            raise InvalidInput(
                f"{source} is on another storage server: an auto image fills from one on {storage}"
            )
        if wanted_sum is not None:
            raise InvalidInput("--sha256 is for archives, not images")
        _needs(driver, where, "clone_volume")
        recorded = f"image {source}"
    if wanted_sum is not None:
        recorded += f" sha256={wanted_sum}"
    if len(recorded) > 255:
        raise InvalidInput("the source to fill from is too long to record (255 characters)")
    if ctx.session.exec(select(FilesystemImage.id).where(FilesystemImage.name == name)).first():
        raise AlreadyExists(f"filesystem image {name!r} already exists")
    ctx.rollback()
    volume = driver.create_volume(where, name, size_mb)
    row = FilesystemImage(
        name=name,
        storage_id=storage_id,
        location=volume.location,
        origin=ImageOrigin.AUTO.value,
        state=ImageState.CREATING.value,
        size_mb=volume.size_mb,
        source=recorded,
        progress=waiting,
        comment=comment,
    )
    _keep_new_image(ctx, row, f"filesystem image {name} added, to be filled from {recorded} "
                    f"on the first start of a VE ({size_mb} MB on {storage_row.name}:{volume.location})", driver, where)  # fmt: skip
    return public.filesystem_images(ctx.session, [row])[0]


def auto_images_wanted(ctx: ServiceContext) -> list[str]:
    """Auto images not filled yet that a VE asked to run uses (what the engine fills)."""
    rows = ctx.session.exec(
        select(FilesystemImage.name)
        .join(VirtualEnvironment, col(VirtualEnvironment.fs_image_id) == col(FilesystemImage.id))
        .where(
            FilesystemImage.origin == ImageOrigin.AUTO.value,
            FilesystemImage.state == ImageState.CREATING.value,
            VirtualEnvironment.desired_state == VEDesiredState.RUNNING.value,
            # Filled by the machine placed into it (services.local_fill), not here.
            col(FilesystemImage.source).not_like(f"{local_fill.LOCAL_DISK}%"),
        )
        .distinct()
    ).all()
    return sorted(rows)


def fill_auto_image(ctx: ServiceContext, name: str, *, progress: ProgressFn | None = None) -> bool:
    """Fill an auto image from its source, once: False when another job has it (or it
    is filled already). On failure the image goes to state ``error`` with the reason
    (its VEs say so) and the volume is emptied again by the next try."""
    import tempfile
    from pathlib import Path

    from qrm_core import archive as archives

    try:
        lock = job_lock(ctx, name)
        lock.__enter__()
    except InUse:
        return False
    try:
        row, storage_row = _image_and_storage(ctx, name)
        if row.origin != ImageOrigin.AUTO.value or row.state != ImageState.CREATING.value:
            ctx.rollback()
            return False
        driver, where, location, recorded = (
            driver_for(ctx, storage_row),
            target(storage_row),
            row.location,
            row.source,
        )
        kind, _, rest = recorded.partition(" ")
        if kind == local_fill.LOCAL_DISK:
            ctx.rollback()
            return False  # its machine fills it (services.local_fill)
        text, _, checksum = rest.partition(" sha256=")
        src_location = None
        if kind == "image":
            other = get_fs_image_row(ctx, text)
            if other.state != ImageState.READY.value:
                raise InvalidInput(f"{text} is not ready ({other.state})")
            _refuse_if_busy(ctx, other, "fill from")
            src_location = other.location
        ctx.rollback()

        def say(line: str) -> None:
            _set(ctx, name, progress=f"filling from {text[:80]}: {line}"[:255])
            if progress is not None:
                progress(line)

        say("starting")
        ctx.record("filesystem-image", name, f"filesystem image {name}: filling from {recorded} started")
        ctx.commit()
        started = time.monotonic()
        if kind == "image":
            assert src_location is not None
            say("copying")
            with contextlib.suppress(NotFound):
                driver.remove_volume(where, location)
            volume = driver.clone_volume(where, src_location, name)
            how = volume.how or "copied"
            _set(ctx, name, location=volume.location)
        else:
            work_parent = ctx.settings.data_dir / "tmp"
            work_parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="fill-", dir=work_parent) as tmp:
                if text.startswith(("http://", "https://")):
                    local = Path(tmp) / "archive"
                    archives.download(text, local, say)
                else:
                    local = Path(text)
                    if not local.is_file():
                        raise InvalidInput(f"the archive {text} is gone")
                say("verifying the archive")
                digest = archives.sha256_of(local)
                if checksum and digest != checksum:
                    raise InvalidInput(f"the archive's sha256 is {digest}, not {checksum}")
                info = archives.check_archive(local)
                how = _unpack(ctx, driver, where, location, local, info, say)
        _set(ctx, name, state=ImageState.READY.value, progress="", source_at=utcnow())
        ctx.record("filesystem-image", name,
                   f"filesystem image {name} filled from {recorded} in {time.monotonic() - started:.0f} s ({how})")  # fmt: skip
        ctx.commit()
        return True
    except QrmError as exc:
        ctx.rollback()
        _set(ctx, name, state=ImageState.ERROR.value, progress=f"filling failed: {exc}"[:255])
        ctx.record(
            "filesystem-image", name, f"filesystem image {name}: filling failed: {exc}", EventLevel.ERROR
        )
        ctx.commit()
        raise
    finally:
        lock.__exit__(None, None, None)
