"""Building a boot image: a kernel plus an initrd holding busybox, drivers and the node agent.

The initrd is what every machine qrm manages boots first. Its ``/init`` is
the qrm node agent (``agent.sh``, a POSIX shell script for busybox ash): it
brings up the network, registers with the qrm server, heartbeats, obeys
reboot and halt, and boots the machine into its virtual environment. Layout::

    /init                          the node agent
    /bin/busybox, /bin/sh, ...     busybox-static and its applets (symlinks)
    /dev/console, /dev/null        device nodes (the kernel needs a console before /init)
    /etc/qrm/release               kernel version and qrm version of this image
    /etc/qrm/modules.load          per module: what to insmod, in order (from modules.dep)
    /etc/qrm/modules.nic           NIC drivers, in load order (fallback when coldplug finds none)
    /etc/qrm/modules.alias         module, ERE, literal prefix: for coldplug matching
    /lib/modules/KVER/...          the selected modules, uncompressed, plus modules.dep/alias
    /usr/sbin/iscsistart           open-iscsi's boot-time initiator (iSCSI roots), with the
    /lib/..., /lib64/...           shared libraries it needs, where the build host has it

Everything is written through :class:`~qrm_core.bootimage.cpio.Archive`, so
the same kernel, busybox, agent and module selection give the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from qrm_core import __version__
from qrm_core.bootimage import kernel as kernels
from qrm_core.bootimage.cpio import Archive
from qrm_core.bootimage.modules import ModuleDb, Selection, select
from qrm_core.errors import DriverError, InvalidInput

#: ``progress(what, done, total)``: ``what`` is one line for people; ``done``
#: and ``total`` are in the same (arbitrary) units, ``total`` fixed for a build.
Progress = Callable[[str, int, int], None]

PROGRESS_TOTAL = 1000
DEFAULT_BUSYBOX = Path("/bin/busybox")
#: open-iscsi's initiator for the boot (it logs in and leaves the session to the kernel).
DEFAULT_ISCSISTART = Path("/usr/sbin/iscsistart")
ISCSISTART_PATH = "usr/sbin/iscsistart"
DEFAULT_CMDLINE = "console=tty0 console=ttyS0,115200n8 panic=10"
#: Applets the agent uses; a busybox without one of them cannot boot a machine.
REQUIRED_APPLETS = (
    "sh",
    "awk",
    "cat",
    "cp",
    "cut",
    "df",
    "du",
    "grep",
    "insmod",
    "ip",
    "ln",
    "mkdir",
    "mount",
    "poweroff",
    "reboot",
    "rm",
    "sed",
    "sleep",
    "switch_root",
    "tar",
    "timeout",
    "tr",
    "udhcpc",
    "umount",
    "wget",
)
AGENT_RESOURCE = "agent.sh"


def agent_script() -> bytes:
    """The node agent shipped with this qrm (package data)."""
    return resources.files("qrm_core.bootimage").joinpath(AGENT_RESOURCE).read_bytes()


@dataclass(frozen=True)
class BuildResult:
    """What a build produced.

    :ivar kernel_version: The kernel release.
    :ivar kernel: The kernel file to boot (a copy in the output directory).
    :ivar initrd: The gzip-compressed newc initrd.
    :ivar kernel_sha256: Checksum of the kernel.
    :ivar initrd_sha256: Checksum of the initrd (equal for equal inputs).
    :ivar modules: Modules in the initrd, in load order.
    :ivar missing_modules: Requested modules this kernel does not have.
    :ivar origin: Where the kernel came from.
    :ivar iscsi_initiator: Path of the iSCSI initiator in the initrd, if any.
    """

    kernel_version: str
    kernel: Path
    initrd: Path
    kernel_sha256: str
    initrd_sha256: str
    modules: list[str]
    missing_modules: list[str]
    origin: str
    nic_modules: list[str] = field(default_factory=list)
    #: The iSCSI initiator in the initrd (None: the build host has no open-iscsi, so
    #: this image cannot boot iSCSI roots).
    iscsi_initiator: str | None = None


class _Reporter:
    """Maps the build's phases onto one progress scale."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    def __call__(self, what: str, fraction: float) -> None:
        if self._progress is not None:
            self._progress(what, int(PROGRESS_TOTAL * min(max(fraction, 0.0), 1.0)), PROGRESS_TOTAL)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# busybox
# ---------------------------------------------------------------------------


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    import struct

    with open(path, "rb") as handle:
        ident = handle.read(16)
        if ident[:4] != b"\x7fELF":
            return False
        is64 = ident[4] == 2
        endian = "<" if ident[5] == 1 else ">"
        handle.seek(0)
        header = handle.read(64 if is64 else 52)
        if is64:
            phoff, phentsize, phnum = (
                struct.unpack_from(endian + "Q", header, 32)[0],
                struct.unpack_from(endian + "H", header, 54)[0],
                struct.unpack_from(endian + "H", header, 56)[0],
            )
        else:
            phoff, phentsize, phnum = (
                struct.unpack_from(endian + "I", header, 28)[0],
                struct.unpack_from(endian + "H", header, 42)[0],
                struct.unpack_from(endian + "H", header, 44)[0],
            )
        for index in range(phnum):
            handle.seek(phoff + index * phentsize)
            (p_type,) = struct.unpack(endian + "I", handle.read(4))
            if p_type == 3:  # PT_INTERP
                return False
    return True


def busybox_applets(busybox: Path) -> list[str]:
    """The applet paths busybox installs (``bin/sh``, ``usr/bin/wget``, ...), checked."""
    if not busybox.is_file():
        raise InvalidInput(f"busybox {busybox} is missing; install the busybox-static package")
    if not _is_static_elf(busybox):
        raise InvalidInput(
            f"{busybox} is not a statically linked busybox; install busybox-static "
            "(the initrd has no C library)"
        )
    try:
        done = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise InvalidInput(f"cannot run {busybox}: {exc.strerror}") from None
    if done.returncode != 0:
        raise InvalidInput(f"{busybox} --list-full failed (exit status {done.returncode})")
    applets = sorted({line.strip().lstrip("/") for line in done.stdout.splitlines() if line.strip()})
    names = {applet.rsplit("/", 1)[-1] for applet in applets}
    lacking = [name for name in REQUIRED_APPLETS if name not in names]
    if lacking:
        raise InvalidInput(f"{busybox} lacks applet(s) the node agent needs: {', '.join(lacking)}")
    return applets


# ---------------------------------------------------------------------------
# dynamically linked programs (the iSCSI initiator)
# ---------------------------------------------------------------------------


def shared_libraries(program: Path) -> list[str]:
    """The absolute paths of the shared libraries ``program`` loads (its program
    interpreter included), as the build host's dynamic loader resolves them."""
    try:
        done = subprocess.run(["ldd", str(program)], capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        raise InvalidInput(f"cannot run ldd on {program}: {exc.strerror}") from None
    if done.returncode != 0:
        raise InvalidInput(f"ldd {program} failed: {(done.stderr or done.stdout).strip()[:200]}")
    found: list[str] = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            path = rest.strip().split(" ", 1)[0]
            if path == "not":
                raise InvalidInput(f"{program} needs {name.strip()}, which this host does not have")
        else:
            path = line.split(" ", 1)[0]
        if path.startswith("/") and path not in found:
            found.append(path)
    return found


def add_program(archive: Archive, program: Path, shipped: str) -> None:
    """Add a dynamically linked program at ``shipped`` with every library it loads, each at
    the path the loader looks for it (the real file behind any symbolic link)."""
    for library in shared_libraries(program):
        relative = library.lstrip("/")
        parent = relative.rsplit("/", 1)[0]
        parts = parent.split("/")
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in archive:
                archive.add_dir(directory, 0o755)
        if relative not in archive:
            archive.add_file(relative, source=Path(os.path.realpath(library)), mode=0o755)
    archive.add_file(shipped, source=program, mode=0o755)


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------


def _module_file(modules_dir: Path, relative: str, scratch: Path) -> tuple[Path, str]:
    """An uncompressed copy of a module (or the file itself) and its shipped relative path."""
    source = modules_dir / relative
    if not source.is_file():
        raise InvalidInput(f"modules.dep names {relative}, which is missing from {modules_dir}")
    if relative.endswith(".ko"):
        return source, relative
    for suffix, opener in ((".ko.xz", lzma.open), (".ko.gz", gzip.open)):
        if relative.endswith(suffix):
            shipped = relative[: -len(suffix)] + ".ko"
            target = scratch / shipped
            target.parent.mkdir(parents=True, exist_ok=True)
            with opener(source, "rb") as packed, open(target, "wb") as plain:
                shutil.copyfileobj(packed, plain)
            return target, shipped
    if relative.endswith(".ko.zst"):
        shipped = relative[: -len(".ko.zst")] + ".ko"
        target = scratch / shipped
        target.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which("zstd") is None:
            raise DriverError(f"{relative} is zstd-compressed; install zstd to build this boot image")
        subprocess.run(["zstd", "-q", "-d", "-f", "-o", str(target), str(source)], check=True)
        return target, shipped
    raise InvalidInput(f"unknown module file type {relative}")


def _module_lists(selection: Selection, shipped_paths: dict[str, str]) -> dict[str, bytes]:
    """The agent's module files and a modules.dep/modules.alias subset for busybox modprobe."""
    load_lines = [
        name + " " + " ".join(shipped_paths[m] for m in selection.closures[name]) for name in selection.order
    ]
    nic = [m for m in selection.order if m in set(selection.groups.get("nic", []))]
    alias_lines = [f"{module} {ere} {prefix}".rstrip() for ere, prefix, module in selection.aliases]
    dep_lines = []
    for name in selection.order:
        requirements = [m for m in selection.closures[name] if m != name]
        dep_lines.append(
            f"{shipped_paths[name]}: " + " ".join(shipped_paths[m] for m in reversed(requirements))
        )
    return {
        "etc/qrm/modules.load": ("\n".join(load_lines) + "\n").encode(),
        "etc/qrm/modules.nic": ("\n".join(nic) + "\n").encode(),
        "etc/qrm/modules.alias": ("\n".join(alias_lines) + "\n").encode(),
        "modules.dep": ("\n".join(line.rstrip() for line in dep_lines) + "\n").encode(),
    }


def _modprobe_aliases(db: ModuleDb, shipped: set[str]) -> bytes:
    lines = [f"alias {pattern} {module}" for pattern, module in db.aliases if module in shipped]
    return ("\n".join(sorted(lines)) + "\n").encode()


# ---------------------------------------------------------------------------
# the build
# ---------------------------------------------------------------------------


class _Counting:
    """A write-only stream that reports how far the archive has got."""

    def __init__(self, raw: BinaryIO, total: int, report: Callable[[int], None]) -> None:
        self._raw = raw
        self._total = max(total, 1)
        self._written = 0
        self._next = 0
        self._report = report

    def write(self, data: bytes) -> int:
        self._raw.write(data)
        self._written += len(data)
        if self._written >= self._next:
            self._report(self._written)
            self._next = self._written + (1 << 20)
        return len(data)


def assemble(
    tree: kernels.KernelTree,
    *,
    work_dir: Path,
    busybox: Path = DEFAULT_BUSYBOX,
    extra_modules: Iterable[str] = (),
    agent: bytes | None = None,
    progress: Progress | None = None,
    iscsistart: Path | None = DEFAULT_ISCSISTART,
) -> tuple[Archive, Selection]:
    """Describe the initrd of ``tree`` (nothing is compressed yet).

    ``iscsistart``: open-iscsi's boot initiator, added with its libraries when
    the file exists (``None``: leave it out); without it the image boots every
    root but iSCSI."""
    report = _Reporter(progress)
    applets = busybox_applets(busybox)  # fail fast, before the expensive part
    report("computing module dependencies", 0.10)
    modules_dir = kernels.ensure_modules_dep(tree, work_dir)
    db = ModuleDb.read(modules_dir)
    selection = select(db, extra_modules)
    archive = Archive()
    for directory, mode in (
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("newroot", 0o755),
        ("root", 0o700),
        ("mnt", 0o755),
        ("var", 0o755),
        ("etc", 0o755),
    ):
        archive.add_dir(directory, mode)
    archive.add_device("dev/console", "c", 5, 1, 0o600)
    archive.add_device("dev/null", "c", 1, 3, 0o666)

    report("adding kernel modules", 0.15)
    scratch = work_dir / "modules"
    shipped_paths: dict[str, str] = {}
    module_root = f"lib/modules/{tree.version}"
    for index, name in enumerate(selection.order):
        source, shipped = _module_file(modules_dir, db.paths[name], scratch)
        shipped_paths[name] = shipped
        archive.add_file(f"{module_root}/{shipped}", source=source, mode=0o644)
        report(
            f"adding kernel modules ({index + 1}/{len(selection.order)})",
            0.15 + 0.25 * (index + 1) / len(selection.order),
        )
    lists = _module_lists(selection, shipped_paths)
    archive.add_file(f"{module_root}/modules.dep", data=lists.pop("modules.dep"))
    archive.add_file(f"{module_root}/modules.alias", data=_modprobe_aliases(db, set(selection.order)))
    for path, data in lists.items():
        archive.add_file(path, data=data)

    report("adding busybox", 0.42)
    archive.add_file("bin/busybox", source=busybox, mode=0o755)
    for applet in applets:
        if applet != "bin/busybox":
            archive.add_symlink(applet, "/bin/busybox")

    initiator = ""
    if iscsistart is not None and iscsistart.is_file():
        report("adding the iSCSI initiator", 0.44)
        add_program(archive, iscsistart, ISCSISTART_PATH)
        initiator = "/" + ISCSISTART_PATH

    report("adding the node agent", 0.45)
    archive.add_file("init", data=agent if agent is not None else agent_script(), mode=0o755)
    archive.add_file(
        "etc/qrm/release",
        data=f"kernel={tree.version}\nqrm={__version__}\niscsi={initiator}\n".encode(),
    )
    archive.add_file("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n")
    archive.add_file("etc/group", data=b"root:x:0:\n")
    return archive, selection


def build_initrd(
    tree: kernels.KernelTree,
    out_dir: Path,
    *,
    work_dir: Path,
    busybox: Path = DEFAULT_BUSYBOX,
    extra_modules: Iterable[str] = (),
    agent: bytes | None = None,
    progress: Progress | None = None,
    compresslevel: int = 6,
    iscsistart: Path | None = DEFAULT_ISCSISTART,
) -> BuildResult:
    """Build ``out_dir/initrd`` and copy the kernel to ``out_dir/vmlinuz``."""
    report = _Reporter(progress)
    kernels.check_kernel_file(tree.vmlinuz)
    archive, selection = assemble(
        tree,
        work_dir=work_dir,
        busybox=busybox,
        extra_modules=extra_modules,
        agent=agent,
        progress=progress,
        iscsistart=iscsistart,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    initrd = out_dir / "initrd"
    total = archive.content_size()
    report("writing the initrd", 0.47)
    tmp = initrd.with_name(f"initrd.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
            ) as gz:
                counting = _Counting(
                    gz,  # type: ignore[arg-type]
                    total,
                    lambda n: report("compressing the initrd", 0.47 + 0.48 * min(n / total, 1.0)),
                )
                archive.write(counting)  # type: ignore[arg-type]
        os.replace(tmp, initrd)
    finally:
        tmp.unlink(missing_ok=True)
    kernel = out_dir / "vmlinuz"
    shutil.copyfile(tree.vmlinuz, kernel)
    report("computing checksums", 0.97)
    result = BuildResult(
        kernel_version=tree.version,
        kernel=kernel,
        initrd=initrd,
        kernel_sha256=sha256_of(kernel),
        initrd_sha256=sha256_of(initrd),
        modules=list(selection.order),
        missing_modules=list(selection.missing),
        origin=tree.origin,
        nic_modules=[m for m in selection.order if m in set(selection.groups.get("nic", []))],
        iscsi_initiator="/" + ISCSISTART_PATH if ISCSISTART_PATH in archive else None,
    )
    report("done", 1.0)
    return result


def resolve_kernel(
    kernel_version: str,
    *,
    work_dir: Path,
    kernel_deb: Path | None = None,
    download: bool = False,
    cache_dir: Path | None = None,
    boot_dir: Path = Path("/boot"),
    modules_root: Path = Path("/lib/modules"),
    progress: Progress | None = None,
) -> kernels.KernelTree:
    """Find kernel ``kernel_version``: a package file, a download, or ``/boot``."""
    report = _Reporter(progress)
    if kernel_deb is not None and download:
        raise InvalidInput("give --kernel-deb or --download, not both")
    if download:
        if cache_dir is None:
            raise InvalidInput("--download needs a cache directory")
        report(f"downloading linux-image-{kernel_version}", 0.0)
        kernel_deb = kernels.download_deb(kernel_version, cache_dir)
    if kernel_deb is not None:
        report(f"unpacking {kernel_deb.name}", 0.02)
        return kernels.from_deb(kernel_deb, kernel_version, work_dir)
    report(f"looking for kernel {kernel_version} in {boot_dir}", 0.02)
    return kernels.from_boot(kernel_version, boot_dir=boot_dir, modules_root=modules_root)
