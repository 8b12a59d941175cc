"""Where a boot image's kernel comes from: ``/boot``, a Debian kernel package, or apt.

A boot image needs a kernel file (``vmlinuz-KVER``) and the module tree of
that same kernel (``lib/modules/KVER``) to take drivers from. Three sources:

* the machine's own ``/boot/vmlinuz-KVER`` with ``/lib/modules/KVER``;
* a Debian kernel package file (``linux-image-KVER_*.deb``), unpacked with
  ``dpkg-deb`` into a work directory (it is never installed);
* (opt-in) ``apt-get download linux-image-KVER`` into a cache directory,
  then as above. Downloads are kept, so ``qrm init`` can later build the
  default boot image from the cache without the network.

Debian's packages ship no ``modules.dep``: :func:`ensure_modules_dep` runs
``depmod -b`` on the unpacked tree (or on a copy, when the tree is not ours to
write). Every failure is a one-line :class:`~qrm_core.errors.InvalidInput` or
:class:`~qrm_core.errors.DriverError` that says what to do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qrm_core.errors import DriverError, InvalidInput

PACKAGE_PREFIX = "linux-image-"
_DEB_NAME = re.compile(
    r"^linux-image-(?P<kver>[A-Za-z0-9][A-Za-z0-9.+~-]*)_(?P<version>[^_/]+)_(?P<arch>[a-z0-9]+)\.deb$"
)
_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class KernelTree:
    """A kernel and its modules, ready to build from.

    :ivar version: The kernel release (``uname -r``), e.g. ``6.1.0-56-amd64``.
    :ivar vmlinuz: The kernel file.
    :ivar modules_dir: ``.../lib/modules/<version>``, holding ``modules.dep``
        (or not yet: see :func:`ensure_modules_dep`).
    :ivar origin: One line saying where it came from (for events and errors).
    :ivar owned: True when the tree lives in a work directory qrm may write to.
    """

    version: str
    vmlinuz: Path
    modules_dir: Path
    origin: str
    owned: bool = False


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _run(args: list[str], what: str, *, cwd: Path | None = None, timeout: float = 600) -> str:
    tool = args[0]
    if shutil.which(tool) is None:
        raise DriverError(f"{tool} is not installed; it is needed to {what}")
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise DriverError(f"{tool} did not finish within {int(timeout)} s while trying to {what}") from None
    if done.returncode != 0:
        detail = _one_line(done.stderr) or _one_line(done.stdout) or f"exit status {done.returncode}"
        raise DriverError(f"could not {what}: {detail}")
    return done.stdout


def _check_version_matches(wanted: str, found: list[str], where: str) -> str:
    if wanted in found:
        return wanted
    if not found:
        raise InvalidInput(f"{where} holds no kernel")
    raise InvalidInput(f"{where} holds kernel {', '.join(sorted(found))}, not {wanted} (give -k {found[0]})")


def from_boot(
    version: str, *, boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")
) -> KernelTree:
    """The machine's own installed kernel ``version``."""
    vmlinuz = boot_dir / f"vmlinuz-{version}"
    if not vmlinuz.is_file():
        installed = (
            sorted(p.name.removeprefix("vmlinuz-") for p in boot_dir.glob("vmlinuz-*"))
            if boot_dir.is_dir()
            else []
        )
        hint = f"installed: {', '.join(installed)}" if installed else "no kernel is installed there"
        raise InvalidInput(f"there is no {vmlinuz} ({hint}); give --kernel-deb FILE or --download")
    modules_dir = modules_root / version
    if not modules_dir.is_dir():
        raise InvalidInput(
            f"{vmlinuz} has no modules directory {modules_dir}; install its modules or use --kernel-deb"
        )
    return KernelTree(version=version, vmlinuz=vmlinuz, modules_dir=modules_dir, origin=f"{vmlinuz}")


def boot_kernel_versions(
    boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")
) -> list[str]:
    """Kernel versions installed with both a kernel file and modules, newest last."""
    if not boot_dir.is_dir():
        return []
    versions = [
        p.name.removeprefix("vmlinuz-")
        for p in boot_dir.glob("vmlinuz-*")
        if p.is_file() and (modules_root / p.name.removeprefix("vmlinuz-")).is_dir()
    ]
    return sorted(versions, key=_version_key)


def _version_key(text: str) -> list[tuple[int, int | str]]:
    """Sort key that orders ``6.1.0-9`` before ``6.1.0-10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.+~-]", text)]


def deb_fields(deb: Path) -> tuple[str, str]:
    """``(package, version)`` of a Debian package file, checked with ``dpkg-deb``."""
    if not deb.is_file():
        raise InvalidInput(f"kernel package {str(deb)!r} is not a file")
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise InvalidInput(f"{deb} is not a Debian package (.deb)")
    out = _run(["dpkg-deb", "--showformat=${Package}\\n${Version}\\n", "--show", str(deb)], f"read {deb}")
    lines = out.splitlines()
    if len(lines) < 2:
        raise InvalidInput(f"{deb} is not a Debian package (.deb)")
    return lines[0].strip(), lines[1].strip()


def from_deb(deb: Path, version: str, work_dir: Path) -> KernelTree:
    """Unpack a ``linux-image-*`` package into ``work_dir`` and return its kernel ``version``."""
    package, package_version = deb_fields(deb)
    if not package.startswith(PACKAGE_PREFIX):
        raise InvalidInput(f"{deb} is package {package}, not a kernel package ({PACKAGE_PREFIX}...)")
    # Debian names kernel packages after the release they hold: check before
    # spending seconds unpacking ~400 MB.
    named = package.removeprefix(PACKAGE_PREFIX).removesuffix("-unsigned")
    if not any(ch.isdigit() for ch in named):
        raise InvalidInput(
            f"{deb.name} is the metapackage {package}; use the package it depends on "
            f"(apt-cache depends {package})"
        )
    if named != version:
        raise InvalidInput(f"{deb.name} holds kernel {named}, not {version} (give -k {named})")
    root = work_dir / "kernel-package"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpack {deb}")
    where = f"package {package} {package_version}"
    # Newer Debian releases ship modules under usr/lib/modules (merged /usr).
    modules_root = root / "lib" / "modules"
    if not modules_root.is_dir() and (root / "usr" / "lib" / "modules").is_dir():
        (root / "lib").mkdir(exist_ok=True)
        modules_root.symlink_to(Path("..") / "usr" / "lib" / "modules")
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    version = _check_version_matches(version, kernels, where)
    modules_dir = modules_root / version
    if not modules_dir.is_dir():
        raise InvalidInput(f"{where} has no modules for kernel {version}")
    return KernelTree(
        version=version,
        vmlinuz=root / "boot" / f"vmlinuz-{version}",
        modules_dir=modules_dir,
        origin=f"{where} ({deb.name})",
        owned=True,
    )


def cached_debs(cache_dir: Path) -> list[tuple[str, Path]]:
    """Kernel packages in ``cache_dir`` as ``(kernel version, file)``, newest kernel last."""
    if not cache_dir.is_dir():
        return []
    found = []
    for path in cache_dir.glob("linux-image-*.deb"):
        match = _DEB_NAME.match(path.name)
        if match and path.is_file():
            found.append((match.group("kver"), path))
    return sorted(found, key=lambda item: (_version_key(item[0]), item[1].name))


def download_deb(version: str, cache_dir: Path) -> Path:
    """``apt-get download linux-image-<version>`` into ``cache_dir`` (kept there); reuse a cached file."""
    for kver, path in cached_debs(cache_dir):
        if kver == version:
            return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    package = f"{PACKAGE_PREFIX}{version}"
    try:
        _run(["apt-get", "download", "-q", package], f"download {package} with apt-get", cwd=cache_dir)
    except DriverError as exc:
        if any(
            text in exc.message
            for text in ("Unable to locate", "Couldn't find any package", "no installation candidate")
        ):
            raise InvalidInput(
                f"apt knows no package {package}; check -k (apt-cache search linux-image) "
                "or run apt-get update"
            ) from None
        raise
    for kver, path in cached_debs(cache_dir):
        if kver == version:
            return path
    raise DriverError(f"apt-get download {package} left no package file in {cache_dir}")


def ensure_modules_dep(tree: KernelTree, work_dir: Path) -> Path:
    """The directory holding ``modules.dep`` for ``tree``: the tree itself, or a
    copy made by ``depmod -b`` when the tree has none (Debian packages ship none)."""
    if (tree.modules_dir / "modules.dep").is_file() and (tree.modules_dir / "modules.alias").is_file():
        return tree.modules_dir
    if tree.owned:
        base = tree.modules_dir.parent.parent.parent
        _run(["depmod", "-b", str(base), tree.version], f"compute module dependencies of {tree.version}")
        return tree.modules_dir
    # Not ours to write: depmod a private copy.
    base = work_dir / "depmod"
    copy = base / "lib" / "modules" / tree.version
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(tree.modules_dir, copy, symlinks=True)
    _run(["depmod", "-b", str(base), tree.version], f"compute module dependencies of {tree.version}")
    return copy


def check_kernel_file(path: Path) -> None:
    """Refuse what is obviously not a bootable kernel image (an ELF ``vmlinux``, a stub)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == _ELF_MAGIC:
        raise InvalidInput(f"{path} is an ELF vmlinux, not a bootable kernel image (vmlinuz)")
    if path.stat().st_size < 64 * 1024:
        raise InvalidInput(f"{path} is too small to be a kernel image")
