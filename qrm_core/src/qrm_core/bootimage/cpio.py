"""A deterministic writer for the "newc" cpio format the Linux kernel unpacks as its initramfs.

Why not ``cpio -o`` or ``find | cpio``: the output of those depends on the
order the filesystem lists directories in, on the builder's clock, user and
inode numbers. A boot image must be reproducible: the same inputs give the
same bytes, so an operator can tell from a checksum whether two machines boot
the same thing, and a rebuild that changes nothing changes nothing.

Here every entry is described in memory (path, type, mode, content source),
then written in one pass:

* entries sorted by path components, so a directory always precedes what it
  holds;
* owner and group 0, mtime fixed (0 unless told otherwise), inode numbers
  1, 2, 3, ... in that order, ``nlink`` 2 for directories and 1 otherwise;
* device nodes (``/dev/console``) are written as headers, so no root rights
  and no ``mknod`` are needed to build an image.

The gzip wrapper (:func:`write_gzip`) stores no file name and mtime 0.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from qrm_core.errors import InvalidInput

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One member of the archive.

    :ivar path: Relative POSIX path without a leading slash (``bin/busybox``).
    :ivar mode: Full ``st_mode`` (type bits and permissions).
    :ivar data: File content as bytes, or None when ``source`` names a file.
    :ivar source: A file on disk to copy the content from (read at write time).
    :ivar rdev: ``(major, minor)`` of a device node.
    """

    path: str
    mode: int
    data: bytes | None = None
    source: Path | None = None
    rdev: tuple[int, int] = (0, 0)

    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.source is not None:
            return self.source.stat().st_size
        return 0


def _normalise(path: str) -> str:
    """A safe relative path: no empty, ``.`` or ``..`` components, no NUL."""
    if "\0" in path:
        raise InvalidInput(f"archive path {path!r} contains a NUL byte")
    parts = [p for p in PurePosixPath(path.lstrip("/")).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        raise InvalidInput(f"archive path {path!r} is empty or leaves the archive root")
    return "/".join(parts)


class Archive:
    """An in-memory description of an initramfs, written deterministically."""

    def __init__(self, mtime: int = 0) -> None:
        self.mtime = mtime
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return _normalise(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def content_size(self) -> int:
        """Roughly how many bytes :meth:`write` produces (for progress displays)."""
        return sum(entry.size() + 112 + len(entry.path) for entry in self._entries.values())

    def paths(self) -> list[str]:
        return [entry.path for entry in self._sorted()]

    def _add(self, entry: Entry) -> None:
        previous = self._entries.get(entry.path)
        if previous is not None:
            if previous == entry:
                return
            if stat.S_ISDIR(previous.mode) and stat.S_ISDIR(entry.mode):
                self._entries[entry.path] = entry
                return
            raise InvalidInput(f"archive path {entry.path!r} is added twice with different content")
        parent = str(PurePosixPath(entry.path).parent)
        if parent != ".":
            existing = self._entries.get(parent)
            if existing is None:
                self.add_dir(parent)
            elif not stat.S_ISDIR(existing.mode):
                raise InvalidInput(f"archive path {parent!r} is not a directory")
        self._entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(Entry(_normalise(path), stat.S_IFDIR | (mode & 0o7777)))

    def add_file(
        self, path: str, *, data: bytes | None = None, source: Path | None = None, mode: int = 0o644
    ) -> None:
        if (data is None) == (source is None):
            raise ValueError("give exactly one of data and source")
        if source is not None and not source.is_file():
            raise InvalidInput(f"{source} is not a file")
        self._add(Entry(_normalise(path), stat.S_IFREG | (mode & 0o7777), data=data, source=source))

    def add_symlink(self, path: str, target: str) -> None:
        if not target or "\0" in target:
            raise InvalidInput(f"invalid symlink target {target!r} for {path!r}")
        self._add(Entry(_normalise(path), stat.S_IFLNK | 0o777, data=target.encode()))

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        type_bits = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        self._add(Entry(_normalise(path), type_bits | (mode & 0o7777), rdev=(major, minor)))

    def _sorted(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.path.split("/"))

    # -- writing ---------------------------------------------------------

    def write(self, out: BinaryIO) -> int:
        """Write the archive as newc cpio to ``out``; return the number of bytes."""
        written = 0
        for inode, entry in enumerate(self._sorted(), start=1):
            written += _write_entry(out, entry, inode, self.mtime)
        written += _write_header(out, TRAILER, ino=0, mode=0, nlink=1, mtime=0, size=0, rdev=(0, 0))
        # Pad the stream to a 512-byte block, as cpio(1) does.
        tail = (-written) % 512
        out.write(b"\0" * tail)
        return written + tail


def _pad(n: int) -> bytes:
    return b"\0" * ((-n) % 4)


def _write_header(
    out: BinaryIO, name: str, *, ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int]
) -> int:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = MAGIC + b"".join(b"%08X" % value for value in fields)
    blob = header + encoded
    blob += _pad(len(blob))
    out.write(blob)
    return len(blob)


def _iter_source(source: Path) -> Iterator[bytes]:
    with open(source, "rb") as handle:
        yield from iter(lambda: handle.read(_CHUNK), b"")


def _write_entry(out: BinaryIO, entry: Entry, inode: int, mtime: int) -> int:
    size = entry.size()
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    written = _write_header(
        out, entry.path, ino=inode, mode=entry.mode, nlink=nlink, mtime=mtime, size=size, rdev=entry.rdev
    )
    if entry.data is not None:
        out.write(entry.data)
        copied = len(entry.data)
    elif entry.source is not None:
        copied = 0
        for chunk in _iter_source(entry.source):
            out.write(chunk)
            copied += len(chunk)
        if copied != size:
            raise InvalidInput(f"{entry.source} changed size while the archive was written")
    else:
        copied = 0
    out.write(_pad(copied))
    return written + copied + len(_pad(copied))


def write_gzip(archive: Archive, path: Path, *, level: int = 9) -> int:
    """Write ``archive`` as gzip-compressed newc cpio to ``path`` (atomically).

    The gzip header carries no file name and mtime 0, so the file depends on
    the archive's content only. Returns the compressed size.
    """
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0) as gz:
                archive.write(gz)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """Parse an uncompressed newc archive into ``(path, mode, content)`` tuples.

    Used by the tests and by ``qrm boot-image`` diagnostics; stops at the trailer.
    """
    entries: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += (-pos) % 4
        if name == TRAILER:
            return entries
        content = data[pos : pos + size]
        pos += size
        pos += (-pos) % 4
        entries.append((name, mode, content))
