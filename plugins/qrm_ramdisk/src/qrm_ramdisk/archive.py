"""Deterministic root filesystem archives (``.tar.gz``).

A filesystem image of type ramdisk is one archive. The same tree always gives
the same bytes, so a checksum tells whether two images hold the same root,
and importing the same directory twice changes nothing:

* members sorted by path, parents before children (a missing parent
  directory is added, mode 0755);
* modes, numeric owners and modification times come from the source (they
  are part of a root filesystem); user and group names are left out, so the
  importing machine's ``/etc/passwd`` does not leak in;
* GNU tar format (busybox tar, which unpacks it on the node, reads it);
  gzip with no file name and mtime 0.

Sources are a directory or a tar archive (any compression Python reads).
Member names that are absolute or climb out with ``..`` are refused; so are
hard links to outside the archive. Sockets are skipped (they cannot be
archived); extended attributes and ACLs are not kept.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from qrm_core.plugin_api import InvalidInput

GZIP_LEVEL = 6
#: The directories of a new, empty root. The node agent brings busybox and
#: itself, so this skeleton boots: the VE comes up, registers and is active.
SKELETON_DIRS: tuple[tuple[str, int], ...] = (
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("etc/qrm", 0o755),
    ("home", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("var", 0o755),
    ("var/log", 0o755),
)


def clean_name(name: str) -> str | None:
    """A member name relative to the root (``./etc/x`` -> ``etc/x``); None for the root itself."""
    if "\0" in name:
        raise InvalidInput(f"archive member {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise InvalidInput(f"archive member {name!r} is an absolute path")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"archive member {name!r} leaves the archive root")
    return "/".join(parts) if parts else None


def _sort_key(name: str) -> list[str]:
    return name.split("/")


class _Writer:
    """Writes members in the order given (callers sort), normalising metadata."""

    def __init__(self, out: IO[bytes]) -> None:
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=GZIP_LEVEL, mtime=0)
        self._tar = tarfile.open(fileobj=self._gz, mode="w", format=tarfile.GNU_FORMAT)
        self.names: set[str] = set()

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        info.uname = ""
        info.gname = ""
        info.pax_headers = {}
        info.mtime = int(info.mtime)
        self._tar.addfile(info, data)
        self.names.add(info.name)

    def close(self) -> None:
        self._tar.close()
        self._gz.close()


def _parents(names: list[str]) -> list[str]:
    present = set(names)
    missing: set[str] = set()
    for name in names:
        parent = PurePosixPath(name).parent
        while str(parent) != ".":
            if str(parent) not in present:
                missing.add(str(parent))
            parent = parent.parent
    return sorted(missing, key=_sort_key)


def _dir_info(name: str, mode: int = 0o755) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info


def write_skeleton(out: IO[bytes], hostname: str | None = None) -> None:
    """A minimal bootable root (see :data:`SKELETON_DIRS`)."""
    writer = _Writer(out)
    entries: list[tuple[str, tarfile.TarInfo, bytes | None]] = [
        (name, _dir_info(name, mode), None) for name, mode in SKELETON_DIRS
    ]
    if hostname:
        content = (hostname + "\n").encode()
        hostname_info = tarfile.TarInfo("etc/hostname")
        hostname_info.size, hostname_info.mode = len(content), 0o644
        entries.append(("etc/hostname", hostname_info, content))
    for _, info, data in sorted(entries, key=lambda e: _sort_key(e[0])):
        writer.add(info, None if data is None else _bytes(data))
    writer.close()


def _bytes(data: bytes) -> IO[bytes]:
    import io

    return io.BytesIO(data)


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Every path under ``root`` as ``(relative name, path)``, sorted, without following links."""
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise InvalidInput(f"cannot read {directory}: {exc.strerror}") from None
        children = []
        for name in names:
            path = directory / name
            relative = f"{prefix}{name}"
            yield relative, path
            if path.is_dir() and not path.is_symlink():
                children.append((path, relative + "/"))
        stack.extend(reversed(children))


def write_from_directory(source: Path, out: IO[bytes]) -> int:
    """Archive the tree under ``source``; returns the number of members."""
    if not source.is_dir():
        raise InvalidInput(f"{source} is not a directory")
    entries = sorted(_walk(source), key=lambda e: _sort_key(e[0]))
    writer = _Writer(out)
    count = 0
    for name, path in entries:
        try:
            info = writer._tar.gettarinfo(str(path), arcname=name)
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
        if info is None:  # a socket
            continue
        if info.isreg():
            with open(path, "rb") as handle:
                writer.add(info, handle)
        else:
            writer.add(info)
        count += 1
    writer.close()
    return count


def write_from_tarball(source: Path, out: IO[bytes]) -> int:
    """Re-write a tar archive deterministically (checked member by member)."""
    if not source.is_file():
        raise InvalidInput(f"{source} is not a file")
    with tempfile.TemporaryFile() as plain:
        # Pass 1, sequential (cheap for compressed input): checked names, uncompressed copy.
        try:
            with (
                tarfile.open(source, "r:*") as tin,
                tarfile.open(fileobj=plain, mode="w", format=tarfile.GNU_FORMAT) as tmp,
            ):
                for member in tin:
                    name = clean_name(member.name)
                    if name is None:
                        continue
                    member.name = name
                    if member.islnk():
                        target = clean_name(member.linkname)
                        if target is None:
                            raise InvalidInput(f"hard link {name!r} points at the archive root")
                        member.linkname = target
                    if not (
                        member.isfile()
                        or member.isdir()
                        or member.issym()
                        or member.islnk()
                        or member.isdev()
                    ):
                        raise InvalidInput(f"archive member {name!r} has an unsupported type")
                    tmp.addfile(member, tin.extractfile(member) if member.isfile() else None)
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
            raise InvalidInput(f"{source} is not a readable tar archive ({exc})") from None
        plain.seek(0)
        # Pass 2, random access on the uncompressed copy: sorted output.
        with tarfile.open(fileobj=plain, mode="r:") as tmp:
            latest: dict[str, tarfile.TarInfo] = {}
            for member in tmp.getmembers():
                latest[member.name] = member  # a later member replaces an earlier one, as tar does
            names = sorted(latest, key=_sort_key)
            for member in latest.values():
                if member.islnk() and member.linkname not in latest:
                    raise InvalidInput(f"hard link {member.name!r} points outside the archive")
            writer = _Writer(out)
            # Hard links last: their targets must be unpacked before them.
            links = [name for name in names if latest[name].islnk()]
            order = sorted([*(n for n in names if not latest[n].islnk()), *_parents(names)], key=_sort_key)
            order += links
            for name in order:
                found = latest.get(name)
                if found is None:
                    writer.add(_dir_info(name))
                    continue
                writer.add(_copy_info(found), tmp.extractfile(found) if found.isfile() else None)
            writer.close()
            return len(order)


def _copy_info(member: tarfile.TarInfo) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member.name)
    for attr in ("size", "mtime", "mode", "type", "linkname", "uid", "gid", "devmajor", "devminor"):
        setattr(info, attr, getattr(member, attr))
    if not member.isfile():
        info.size = 0
    if member.isfile():
        info.type = tarfile.REGTYPE
    return info


def create_archive(source: Path, target: Path) -> int:
    """Write the archive of ``source`` (a directory or a tar file) to ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            count = write_from_directory(source, out) if source.is_dir() else write_from_tarball(source, out)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def create_skeleton(target: Path, hostname: str | None = None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            write_skeleton(out, hostname)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def member_modes(path: Path) -> dict[str, Any]:
    """``{name: (type, mode, uid, gid)}`` of an archive (for tests and ``qrm ramdisk list``)."""
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: (m.type, stat.S_IMODE(m.mode), m.uid, m.gid) for m in tar.getmembers()}
