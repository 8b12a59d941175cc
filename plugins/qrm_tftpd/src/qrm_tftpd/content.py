"""What each requested name is: generated, a boot image file, a static file or a boot loader.

The lookup order (first match wins) is part of the netboot contract
(``docs/netboot.md``):

1. ``boot.ipxe`` - generated (static text, but the port is written in);
2. ``ipxe/<mac-hexhyp>.ipxe`` - generated from the boot configuration;
3. ``pxelinux.cfg/01-<mac-hexhyp>`` - generated from the boot configuration;
4. ``boot/<image>/vmlinuz`` and ``.../initrd`` - the boot image's files
   (from the database's paths, or fetched from the qrm server);
5. any file under the TFTP root (the operator's own files; a file here
   overrides the boot loader of the same name);
6. the boot loaders from Debian's packages (``undionly.kpxe``, ``ipxe.efi``,
   ``pxelinux.0``, ``ldlinux.c32`` and the other syslinux modules).

Generated names are never shadowed by files in the root (one of tftpy's
faults). Names are treated as paths relative to the root: leading slashes are
dropped (as ``tftpd-hpa -s`` does), ``..``, ``.``, hidden components,
backslashes and control characters are refused, and a file is served only if
what was actually *opened* lies inside the root (checked on the open
descriptor, so a symlink swapped in between cannot lead out).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from qrm_core.plugin_api import BootConfig, QrmError
from qrm_tftpd import render
from qrm_tftpd.server import ERR_ACCESS, ERR_NOT_FOUND, ERR_UNDEFINED, Content, Request, TftpError

log = logging.getLogger("qrm.tftpd")

IPXE_NAME = re.compile(r"^ipxe/([0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5})\.ipxe$")
PXELINUX_NAME = re.compile(r"^pxelinux\.cfg/01-([0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5})$")
BOOT_FILE_NAME = re.compile(r"^boot/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/(vmlinuz|initrd)$")
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
MAX_NAME = 255

#: Boot loaders served from Debian's packages: name -> (settings attribute, package).
IPXE_FILES = ("undionly.kpxe", "undionly.kkpxe", "ipxe.efi", "snponly.efi", "ipxe.pxe", "ipxe.lkrn")
PXELINUX_FILES = ("pxelinux.0", "lpxelinux.0")
SYSLINUX_MODULE = re.compile(r"^[a-z0-9_-]{1,32}\.c32$")
#: What ``qrm tftpd --check`` insists on (the netboot contract's boot loaders).
REQUIRED_LOADERS = {
    "undionly.kpxe": "ipxe",
    "ipxe.efi": "ipxe",
    "pxelinux.0": "pxelinux",
    "ldlinux.c32": "syslinux-common",
}


class BootSource(Protocol):
    """Where boot configurations and boot image files come from."""

    def boot_config(self, mac: str) -> BootConfig:
        """The boot configuration of a MAC (``aa:bb:cc:dd:ee:ff``)."""
        ...

    def boot_file(self, image: str, which: str) -> Content | None:
        """The kernel (``vmlinuz``) or ``initrd`` of a boot image, or None if unknown."""
        ...

    def describe(self) -> str:
        """One line for people: where configurations come from."""
        ...

    def check(self) -> None:
        """Raise a one-line error if the source cannot work (database not initialised)."""
        ...


def normalise_name(raw: str) -> str:
    """A requested file name as a clean relative path, or a :class:`TftpError`."""
    if not raw or len(raw) > MAX_NAME or not _PRINTABLE.fullmatch(raw):
        raise TftpError(ERR_ACCESS, "invalid file name")
    if "\\" in raw:
        raise TftpError(ERR_ACCESS, "invalid file name: backslash")
    parts = [part for part in raw.split("/") if part]
    if not parts:
        raise TftpError(ERR_ACCESS, "invalid file name")
    for part in parts:
        if part.startswith("."):
            raise TftpError(ERR_ACCESS, "access violation: '.', '..' and hidden names are not served")
    return "/".join(parts)


def mac_from_hexhyp(text: str) -> str:
    """``52-54-00-12-34-56`` as ``52:54:00:12:34:56``; a multicast or zero MAC is not found."""
    from qrm_core.plugin_api import validation

    try:
        return validation.mac(text.lower().replace("-", ":"))
    except QrmError:
        raise TftpError(ERR_NOT_FOUND, "file not found (not a usable MAC address)") from None


def open_regular(path: str | os.PathLike[str], *, inside: str | None = None) -> tuple[int, os.stat_result]:
    """Open a regular file for reading; with ``inside``, only if what was opened lies there.

    ``O_NONBLOCK`` keeps a FIFO from blocking the worker; anything that is
    not a regular file (directory, FIFO, device) is refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise TftpError(ERR_NOT_FOUND, "file not found") from None
    except NotADirectoryError:
        raise TftpError(ERR_NOT_FOUND, "file not found") from None
    except PermissionError:
        raise TftpError(ERR_ACCESS, "access violation") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TftpError(ERR_ACCESS, "access violation: symlink loop") from None
        raise TftpError(ERR_UNDEFINED, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TftpError(ERR_ACCESS, "access violation: not a regular file")
        if inside is not None:
            real = _opened_path(fd, path)
            if not real.startswith(inside.rstrip("/") + "/"):
                log.warning("tftp: refused %s: it resolves to %s, outside %s", path, real, inside)
                raise TftpError(ERR_ACCESS, "access violation: outside the boot root")
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int, path: str | os.PathLike[str]) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: fall back to resolving the name (racy, but still contained)
        return os.path.realpath(path)


class FileCache:
    """Small files every machine fetches (boot loaders), kept in memory.

    Keyed by device, inode, size and modification time, so a replaced file
    is read again. Least recently used files go first.
    """

    def __init__(self, limit_bytes: int, max_file: int = 4 << 20) -> None:
        self.limit = limit_bytes
        self.max_file = max_file
        self._items: OrderedDict[tuple[int, int, int, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def content(self, fd: int, st: os.stat_result, what: str) -> Content:
        """A :class:`Content` for an open file: from memory if small (the fd is closed)."""
        if st.st_size > self.max_file or st.st_size > self.limit:
            return Content(size=st.st_size, fd=fd, what=what)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
        if data is None:
            content = Content(size=st.st_size, fd=fd, what=what)
            data = content.read_all()
            with self._lock:
                if key not in self._items:
                    self._items[key] = data
                    self._size += len(data)
                    while self._size > self.limit and self._items:
                        _, old = self._items.popitem(last=False)
                        self._size -= len(old)
        os.close(fd)
        return Content.of_bytes(data, what)


class ContentResolver:
    """Turns a request into :class:`Content` following the lookup order above."""

    def __init__(
        self,
        source: BootSource,
        *,
        root: Path,
        ipxe_dir: Path,
        pxelinux_dir: Path,
        syslinux_modules_dir: Path,
        port: int = 69,
        retry_seconds: int = 10,
        cache_bytes: int = 64 << 20,
    ) -> None:
        self.source = source
        self.root = os.path.realpath(root)
        self.ipxe_dir = ipxe_dir
        self.pxelinux_dir = pxelinux_dir
        self.syslinux_modules_dir = syslinux_modules_dir
        self.port = port
        self.retry_seconds = retry_seconds
        self.cache = FileCache(cache_bytes)
        self._boot_ipxe = render.boot_ipxe(port, retry_seconds).encode()

    def __call__(self, request: Request) -> Content:
        return self.resolve(request.filename)

    def resolve(self, raw_name: str) -> Content:
        name = normalise_name(raw_name)
        if name == "boot.ipxe":
            return Content.of_bytes(self._boot_ipxe, "boot.ipxe")
        match = IPXE_NAME.fullmatch(name)
        if match:
            return self._generated(match.group(1), "ipxe")
        match = PXELINUX_NAME.fullmatch(name)
        if match:
            return self._generated(match.group(1), "pxelinux")
        if name.startswith("ipxe/") and name.endswith(".ipxe"):
            raise TftpError(ERR_NOT_FOUND, "file not found (not a MAC address)")
        match = BOOT_FILE_NAME.fullmatch(name)
        if match:
            content = self.source.boot_file(match.group(1), match.group(2))
            if content is not None:
                return content
        try:
            fd, st = open_regular(os.path.join(self.root, name), inside=self.root)
            return self.cache.content(fd, st, "static file")
        except TftpError as exc:
            if exc.code != ERR_NOT_FOUND:
                raise
        loader = self.loader_path(name)
        if loader is not None:
            fd, st = open_regular(loader)
            return self.cache.content(fd, st, f"boot loader {loader}")
        raise TftpError(ERR_NOT_FOUND, "file not found")

    def loader_path(self, name: str) -> Path | None:
        """Where a boot loader of this name lives in Debian's packages, if it is one."""
        if name in IPXE_FILES:
            return self.ipxe_dir / name
        if name in PXELINUX_FILES:
            return self.pxelinux_dir / name
        if SYSLINUX_MODULE.fullmatch(name):
            return self.syslinux_modules_dir / name
        return None

    def _generated(self, hexhyp: str, kind: str) -> Content:
        mac = mac_from_hexhyp(hexhyp)
        try:
            config = self.source.boot_config(mac)
            if kind == "ipxe":
                text = render.ipxe_script(config, port=self.port, retry_seconds=self.retry_seconds)
            else:
                text = render.pxelinux_config(config, retry_seconds=self.retry_seconds)
            what = f"{kind} for {mac}: {config.mode}" + (f" {config.boot_image}" if config.boot_image else "")
        except (QrmError, OSError) as exc:
            # The machine gets a script that says why and asks again, not a
            # bare TFTP error it cannot explain on its console.
            message = getattr(exc, "message", None) or str(exc)
            log.error("tftp: no boot configuration for %s: %s", mac, message)
            if kind == "ipxe":
                text = render.ipxe_failure(mac, f"boot configuration failed: {message}", self.retry_seconds)
            else:
                text = render.pxelinux_failure(
                    mac, f"boot configuration failed: {message}", self.retry_seconds
                )
            what = f"{kind} for {mac}: failure"
        return Content.of_bytes(text.encode(), what)

    # -- operator checks -------------------------------------------------

    def loader_report(self) -> list[tuple[str, str, str | None]]:
        """Each required boot loader: (name, where it is served from, problem or None)."""
        report: list[tuple[str, str, str | None]] = []
        for name, package in REQUIRED_LOADERS.items():
            in_root = Path(self.root) / name
            if in_root.is_file():
                report.append((name, str(in_root), None))
                continue
            path = self.loader_path(name)
            assert path is not None
            if path.is_file() and os.access(path, os.R_OK):
                report.append((name, str(path), None))
            else:
                report.append((name, str(path), f"missing: install the Debian package {package}"))
        return report


def close_quietly(content: Content | None) -> None:
    if content is not None:
        with contextlib.suppress(Exception):
            content.close()
