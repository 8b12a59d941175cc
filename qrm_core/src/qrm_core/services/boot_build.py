"""Building boot images (``qrm boot-image create``) and the default one of ``qrm init``.

:func:`create_boot_image` builds a kernel + initrd pair from a kernel source
(:mod:`qrm_core.bootimage`) in a temporary directory under the data directory,
then records it through :func:`qrm_core.services.boot_images.add_boot_image`,
which copies the files into ``<data_dir>/boot/<name>/`` with their checksums.
Nothing is recorded when the build fails, and the temporary files go away.

:func:`ensure_default_boot_image` is what ``qrm init`` calls so a fresh
install can boot machines at once: it builds the default boot image from a
kernel package already in the cache (``--download`` puts them there) or from
the machine's own ``/boot``, and otherwise explains how to make one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from sqlmodel import select

from qrm_core.bootimage import builder
from qrm_core.bootimage import kernel as kernels
from qrm_core.config import Settings
from qrm_core.errors import AlreadyExists, InvalidInput, QrmError
from qrm_core.models import BootImage, BootImagePublic
from qrm_core.services import ServiceContext, boot_images
from qrm_core.services import validation as v

DEFAULT_IMAGE_NAME = "default"
Progress = builder.Progress


def kernel_cache_dir(settings: Settings) -> Path:
    """Where ``--download`` keeps Debian kernel packages (``<data_dir>/cache/kernels``)."""
    return settings.data_dir / "cache" / "kernels"


def _work_parent(settings: Settings) -> Path:
    # A kernel package unpacks to ~400 MB: keep it off a small /tmp.
    parent = settings.data_dir / "tmp"
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def create_boot_image(
    ctx: ServiceContext,
    *,
    name: str,
    kernel_version: str,
    kernel_deb: str | Path | None = None,
    download: bool = False,
    make_default: bool = False,
    progress: Progress | None = None,
    cmdline: str | None = None,
    extra_modules: Iterable[str] = (),
    comment: str | None = None,
    busybox: str | Path | None = None,
    kernel_tree: kernels.KernelTree | None = None,
) -> BootImagePublic:
    """Build a boot image for kernel ``kernel_version`` and record it as ``name``.

    The kernel comes from ``kernel_deb`` (a ``linux-image-*.deb`` file), from
    ``apt-get download`` when ``download`` is set, or from ``/boot``; a caller
    that has already unpacked one (a lab, a test) passes ``kernel_tree``. The
    initrd is byte-identical for identical inputs.
    """
    name = v.name(name, "boot image name")
    kernel_version = v.kernel_version(kernel_version)
    cmdline = " ".join(v.kernel_args(builder.DEFAULT_CMDLINE if cmdline is None else cmdline, "command line"))
    comment = v.comment(comment)
    extra = list(extra_modules)
    if ctx.session.exec(select(BootImage.id).where(BootImage.name == name)).first():
        raise AlreadyExists(f"boot image {name!r} already exists")
    deb = Path(kernel_deb).expanduser() if kernel_deb is not None else None
    with tempfile.TemporaryDirectory(prefix="build-", dir=_work_parent(ctx.settings)) as tmp:
        work = Path(tmp)
        if kernel_tree is not None:
            if kernel_tree.version != kernel_version:
                raise InvalidInput(f"the kernel given is {kernel_tree.version}, not {kernel_version}")
            tree = kernel_tree
        else:
            tree = builder.resolve_kernel(
                kernel_version,
                work_dir=work,
                kernel_deb=deb,
                download=download,
                cache_dir=kernel_cache_dir(ctx.settings),
                progress=progress,
            )
        result = builder.build_initrd(
            tree,
            work / "out",
            work_dir=work,
            busybox=Path(busybox) if busybox is not None else builder.DEFAULT_BUSYBOX,
            extra_modules=extra,
            progress=progress,
        )
        if progress is not None:
            progress("recording the boot image", builder.PROGRESS_TOTAL, builder.PROGRESS_TOTAL)
        if not comment:
            comment = v.comment(
                f"built by qrm from {result.origin}; {len(result.modules)} modules; "
                f"initrd sha256 {result.initrd_sha256[:16]}"[:255]
            )
        return boot_images.add_boot_image(
            ctx,
            name=name,
            kernel_version=result.kernel_version,
            kernel=result.kernel,
            initrd=result.initrd,
            cmdline=cmdline,
            make_default=make_default,
            comment=comment,
        )


def default_kernel_source(
    settings: Settings,
    *,
    boot_dir: Path = Path("/boot"),
    modules_root: Path = Path("/lib/modules"),
) -> tuple[str, Path | None] | None:
    """The kernel ``qrm init`` would build from: ``(version, package file)`` for the
    newest cached kernel package, ``(version, None)`` for a kernel in ``/boot``
    (the running one if it is there), or None."""
    cached = kernels.cached_debs(kernel_cache_dir(settings))
    if cached:
        version, path = cached[-1]
        return version, path
    installed = kernels.boot_kernel_versions(boot_dir, modules_root)
    if not installed:
        return None
    running = os.uname().release
    return (running if running in installed else installed[-1]), None


def ensure_default_boot_image(
    ctx: ServiceContext,
    progress: Progress | None = None,
    *,
    boot_dir: Path = Path("/boot"),
    modules_root: Path = Path("/lib/modules"),
) -> str:
    """Make sure idle machines have something to boot; return one line saying what happened.

    Builds the boot image ``default`` when there is no default boot image and
    a kernel source is available; never raises for a failed build (``qrm
    init`` must still finish), the line says what went wrong instead.
    ``boot_dir``/``modules_root`` are where installed kernels are looked for.
    """
    current = boot_images.default_boot_image_row(ctx)
    if current is not None:
        return f"the default boot image is {current.name} (kernel {current.kernel_version})"
    if ctx.session.exec(select(BootImage.id)).first() is not None:
        return "there is no default boot image: choose one with 'qrm boot-image set-default NAME'"
    source = default_kernel_source(ctx.settings, boot_dir=boot_dir, modules_root=modules_root)
    if source is None:
        return (
            "no kernel to build the default boot image from: run "
            "'qrm boot-image create -n default -k KERNEL_VERSION --download --default' "
            "(e.g. -k 6.1.0-56-amd64) or install a kernel in /boot"
        )
    version, deb = source
    name = DEFAULT_IMAGE_NAME
    if ctx.session.exec(select(BootImage.id).where(BootImage.name == name)).first():
        name = f"{DEFAULT_IMAGE_NAME}-{version}"[:64]
    try:
        if deb is None:
            tree = kernels.from_boot(version, boot_dir=boot_dir, modules_root=modules_root)
            image = create_boot_image(
                ctx, name=name, kernel_version=version, kernel_tree=tree, make_default=True, progress=progress
            )
        else:
            image = create_boot_image(
                ctx, name=name, kernel_version=version, kernel_deb=deb, make_default=True, progress=progress
            )
    except QrmError as exc:
        return f"could not build the default boot image from kernel {version}: {exc.message}"
    where = deb.name if deb is not None else str(boot_dir / f"vmlinuz-{version}")
    return f"built the default boot image {image.name} (kernel {image.kernel_version} from {where})"
