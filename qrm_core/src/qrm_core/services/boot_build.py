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
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sqlmodel import select

from qrm_core.bootimage import builder
from qrm_core.bootimage import kernel as kernels
from qrm_core.config import Settings
from qrm_core.errors import AlreadyExists, Conflict, InvalidInput, QrmError
from qrm_core.models import BootImage, BootImagePublic, EventLevel
from qrm_core.services import ServiceContext, boot_images
from qrm_core.services import validation as v

if TYPE_CHECKING:
    from qrm_core.plugins import PluginSystem

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
    taken = ctx.session.exec(select(BootImage.name).where(v.same_name(BootImage.name, name))).first()
    if taken:
        raise AlreadyExists(f"boot image {taken!r} already exists")
    ctx.rollback()  # the read ends here: no transaction stays open while the build runs (minutes)
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
    if ctx.session.exec(select(BootImage.id).where(v.same_name(BootImage.name, name))).first():
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


# ---------------------------------------------------------------------------
# Builds in the server (the console), with their progress
# ---------------------------------------------------------------------------


@dataclass
class Build:
    """A boot image being built in this server process, as far as it got."""

    name: str
    kernel_version: str
    message: str = "starting"
    step: int = 0
    total: int = builder.PROGRESS_TOTAL
    error: str = ""
    finished: bool = False

    @property
    def percent(self) -> int:
        return int(100 * self.step / self.total) if self.total else 0


_BUILDS: dict[str, Build] = {}
_BUILDS_LOCK = threading.Lock()


def builds() -> list[Build]:
    """The builds this server runs or ran (a copy of each, newest last)."""
    with _BUILDS_LOCK:
        return [replace(b) for b in _BUILDS.values()]


def available_kernels(settings: Settings) -> list[tuple[str, str]]:
    """Kernels a boot image can be built from without a download: ``(version,
    where)`` for each cached kernel package and each kernel in ``/boot``."""
    found = [
        (version, f"package {path.name}") for version, path in kernels.cached_debs(kernel_cache_dir(settings))
    ]
    cached = {version for version, _ in found}
    found += [(version, "/boot") for version in kernels.boot_kernel_versions() if version not in cached]
    return found


def build_in_background(
    settings: Settings,
    plugins: PluginSystem,
    actor: str,
    *,
    name: str,
    kernel_version: str,
    make_default: bool = False,
) -> Build:
    """Build a boot image from an available kernel (:func:`available_kernels`)
    in a thread of the server; :func:`builds` follows its progress, the
    events record its outcome. Refused at once (nothing started): a bad name,
    a taken one, a build of it under way, a kernel that is not available."""
    from qrm_core.services import service_context

    name = v.name(name, "boot image name")
    kernel_version = v.kernel_version(kernel_version)
    offered = dict(available_kernels(settings))
    if kernel_version not in offered:
        raise InvalidInput(
            f"kernel {kernel_version} is neither a cached kernel package nor in /boot; "
            "download it with 'qrm boot-image create --download'"
        )
    deb = dict(kernels.cached_debs(kernel_cache_dir(settings))).get(kernel_version)
    with service_context(settings, actor=actor, plugins=plugins, check_schema=False) as ctx:
        if ctx.session.exec(select(BootImage.id).where(BootImage.name == name)).first():
            raise AlreadyExists(f"boot image {name!r} already exists")
    build = Build(name=name, kernel_version=kernel_version)
    with _BUILDS_LOCK:
        running = _BUILDS.get(name)
        if running is not None and not running.finished:
            raise Conflict(f"boot image {name} is being built already")
        _BUILDS[name] = build

    def progress(message: str, step: int, total: int) -> None:
        with _BUILDS_LOCK:
            build.message, build.step, build.total = message, step, total

    def job() -> None:
        try:
            with service_context(settings, actor=actor, plugins=plugins, check_schema=False) as ctx:
                try:
                    create_boot_image(
                        ctx,
                        name=name,
                        kernel_version=kernel_version,
                        kernel_deb=deb,
                        make_default=make_default,
                        progress=progress,
                    )
                except QrmError as exc:
                    ctx.rollback()
                    ctx.record("boot-image", name, f"build of boot image {name} failed: {exc.message}",
                               level=EventLevel.ERROR)  # fmt: skip
                    ctx.commit()
                    raise
        except Exception as exc:  # noqa: BLE001 - shown with the build, recorded above
            with _BUILDS_LOCK:
                build.error = str(getattr(exc, "message", exc))[:300]
        finally:
            with _BUILDS_LOCK:
                build.finished = True

    threading.Thread(target=job, name=f"boot-build-{name}", daemon=True).start()
    return replace(build)
