"""Boot images: a kernel, an initrd carrying the qrm node agent, and a command line."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from sqlmodel import col, select

from qrm_core.errors import AlreadyExists, InUse, InvalidInput, NotFound
from qrm_core.models import BootImage, BootImagePublic, EventLevel, VirtualEnvironment
from qrm_core.services import ServiceContext, public
from qrm_core.services import validation as v


def get_boot_image_row(ctx: ServiceContext, name: str) -> BootImage:
    row = ctx.session.exec(select(BootImage).where(BootImage.name == name)).first()
    if row is None:
        raise NotFound(f"boot image {name!r} does not exist")
    return row


def default_boot_image_row(ctx: ServiceContext) -> BootImage | None:
    return ctx.session.exec(select(BootImage).where(BootImage.default_marker == 1)).first()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _readable_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInput(f"{what} {str(path)!r} is not a file")
    if not os.access(p, os.R_OK):
        raise InvalidInput(f"{what} {str(path)!r} is not readable")
    if p.stat().st_size == 0:
        raise InvalidInput(f"{what} {str(path)!r} is empty")
    return p


def image_dir(ctx: ServiceContext, name: str) -> Path:
    return ctx.settings.boot_dir / name


def add_boot_image(
    ctx: ServiceContext,
    *,
    name: str,
    kernel_version: str,
    kernel: str | Path | None = None,
    initrd: str | Path | None = None,
    cmdline: str | None = None,
    make_default: bool = False,
    comment: str | None = None,
) -> BootImagePublic:
    """Record a boot image; kernel and initrd files, if given, are copied into
    the data directory (``<data_dir>/boot/<name>/``) with their checksums."""
    name = v.name(name, "boot image name")
    kernel_version = v.kernel_version(kernel_version)
    cmdline_tokens = v.kernel_args(cmdline, "command line")
    comment = v.comment(comment)
    if (kernel is None) != (initrd is None):
        raise InvalidInput("give both --kernel and --initrd, or neither")
    kernel_src = _readable_file(kernel, "kernel") if kernel is not None else None
    initrd_src = _readable_file(initrd, "initrd") if initrd is not None else None
    taken = ctx.session.exec(select(BootImage.name).where(v.same_name(BootImage.name, name))).first()
    if taken:
        raise AlreadyExists(f"boot image {taken!r} already exists")
    row = BootImage(
        name=name, kernel_version=kernel_version, cmdline=" ".join(cmdline_tokens), comment=comment
    )
    directory = image_dir(ctx, name)
    copied: list[Path] = []
    if kernel_src is not None and initrd_src is not None:
        directory.mkdir(parents=True, exist_ok=True)
        for src, dest_name, attr in (
            (kernel_src, f"vmlinuz-{kernel_version}", "kernel"),
            (initrd_src, f"initrd.img-{kernel_version}", "initrd"),
        ):
            dest = directory / dest_name
            if src.resolve() != dest.resolve():
                tmp = dest.with_suffix(".part")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
                copied.append(dest)
            setattr(row, f"{attr}_path", str(dest))
            setattr(row, f"{attr}_sha256", sha256_file(dest))
    current_default = default_boot_image_row(ctx)
    becomes_default = make_default or current_default is None
    if becomes_default and current_default is not None:
        current_default.default_marker = None
        ctx.session.add(current_default)
        ctx.session.flush()
    if becomes_default:
        row.default_marker = 1
    ctx.session.add(row)
    ctx.record(
        "boot-image",
        name,
        f"boot image {name} added (kernel {kernel_version}"
        + (", files stored" if kernel_src else ", no files")
        + (", default" if becomes_default else "")
        + ")",
    )
    try:
        ctx.commit()
    except Exception:
        for path in copied:
            path.unlink(missing_ok=True)
        raise
    result = public.boot_images(ctx.session, [row])[0]
    ctx.hooks.boot_image_added(result, ctx.hook_ctx)
    return result


def list_boot_images(ctx: ServiceContext) -> list[BootImagePublic]:
    rows = ctx.session.exec(select(BootImage).order_by(BootImage.name)).all()
    return public.boot_images(ctx.session, rows)


def show_boot_image(ctx: ServiceContext, name: str) -> BootImagePublic:
    return public.boot_images(ctx.session, [get_boot_image_row(ctx, name)])[0]


def set_default_boot_image(ctx: ServiceContext, name: str) -> BootImagePublic:
    row = get_boot_image_row(ctx, name)
    if not row.is_default:
        current = default_boot_image_row(ctx)
        if current is not None:
            current.default_marker = None
            ctx.session.add(current)
            ctx.session.flush()
        row.default_marker = 1
        ctx.session.add(row)
        ctx.record("boot-image", name, f"boot image {name} is now the default")
        ctx.commit()
    return public.boot_images(ctx.session, [row])[0]


def remove_boot_image(ctx: ServiceContext, name: str) -> BootImagePublic:
    row = get_boot_image_row(ctx, name)
    users = ctx.session.exec(
        select(VirtualEnvironment.name)
        .where(VirtualEnvironment.boot_image_id == row.id)
        .order_by(col(VirtualEnvironment.name))
    ).all()
    if users:
        raise InUse(f"boot image {name!r} is used by virtual environment(s) {', '.join(users)}")
    result = public.boot_images(ctx.session, [row])[0]
    was_default = row.is_default
    ctx.session.delete(row)
    ctx.record("boot-image", name, f"boot image {name} removed")
    if was_default:
        ctx.record(
            "boot-image",
            name,
            "the default boot image was removed: idle machines have nothing to boot "
            "until another is made the default",
            level=EventLevel.WARNING,
        )
    ctx.commit()
    directory = image_dir(ctx, name)
    for path_text in (result.kernel_path, result.initrd_path):
        if path_text and Path(path_text).parent == directory:
            Path(path_text).unlink(missing_ok=True)
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    ctx.hooks.boot_image_removed(result, ctx.hook_ctx)
    return result
