"""Root filesystem archives for ``qrm filesystem-image import``: fetched, verified, checked.

An archive is a tar file, plain or compressed with gzip, bzip2, xz or zstd
(images such as those "you download from sites such as Jailtime.org"). Before
anything is made from it, every entry is read (:func:`check_archive`) and the
archive is refused in one line if an entry

* has an absolute path or a ``..`` part, or a hard link to one;
* is a device node outside ``dev/`` (a root filesystem has them only there);
* lies under an entry that is a symbolic link (extracting it would write
  through the link, out of the image);
* is not a file, directory, link, FIFO or device (GNU sparse files are files).

The checksum (``--sha256``) is of the archive as downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from qrm_core.errors import DriverError, InvalidInput

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_DOWNLOAD = 64 * 1024**3
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class ArchiveInfo:
    entries: int
    bytes: int
    compression: str


def check_sha256(text: str | None) -> str | None:
    if text is None:
        return None
    value = text.strip().split()[0] if text.strip() else ""
    if not _SHA256.match(value):
        raise InvalidInput("the checksum must be 64 hexadecimal digits (sha256)")
    return value.lower()


def check_url(url: str) -> str:
    if not re.match(r"^https?://[A-Za-z0-9.\[\]:-]+(/[\x21-\x7e]*)?$", url or "") or len(url) > 2048:
        raise InvalidInput(f"{url[:80]!r} is not an http:// or https:// URL qrm can fetch")
    return url


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, progress: Callable[[str], None] | None = None) -> None:
    """Fetch ``url`` into ``dest`` (refusing more than 64 GiB), one line when it fails."""
    import httpx

    check_url(url)
    got = 0
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as response:
            if response.status_code != 200:
                raise DriverError(f"cannot download {url}: HTTP {response.status_code}")
            with open(dest, "wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    got += len(chunk)
                    if got > MAX_DOWNLOAD:
                        raise DriverError(f"cannot download {url}: larger than 64 GiB")
                    out.write(chunk)
                    if progress is not None:
                        progress(f"downloading: {got / 1e6:.1f} MB")
    except httpx.HTTPError as exc:
        raise DriverError(f"cannot download {url}: {exc}") from None


@contextlib.contextmanager
def _stream(path: Path) -> Iterator[tuple[IO[bytes], str]]:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == ZSTD_MAGIC:
        if shutil.which("zstd") is None:
            raise DriverError("the archive is compressed with zstd: install zstd to import it")
        proc = subprocess.Popen(
            ["zstd", "-dcq", "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        try:
            yield proc.stdout, "zstd"
        finally:
            proc.stdout.close()
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        return
    kinds = {b"\x1f\x8b": "gzip", b"BZ": "bzip2", b"\xfd7": "xz"}
    with open(path, "rb") as handle:
        yield handle, kinds.get(magic[:2], "none")


def check_archive(path: Path) -> ArchiveInfo:
    """Read every entry of the archive; InvalidInput naming the first bad one."""
    entries = size = 0
    links: set[str] = set()
    with _stream(path) as (raw, compression):
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    entries += 1
                    name = member.name
                    _check_path(name, "entry")
                    parts = PurePosixPath(name.lstrip("./") or ".").parts
                    for depth in range(1, len(parts)):
                        if "/".join(parts[:depth]) in links:
                            raise InvalidInput(
                                f"refused: {name} lies under the symbolic link {'/'.join(parts[:depth])}"
                            )
                    clean = "/".join(parts)
                    if member.issym():
                        links.add(clean)
                    elif member.islnk():
                        _check_path(member.linkname, f"hard link {name} ->")
                    elif member.ischr() or member.isblk():
                        if parts[0] != "dev":
                            raise InvalidInput(f"refused: device node {name} outside /dev")
                    elif not (member.isfile() or member.isdir() or member.isfifo()):
                        raise InvalidInput(f"refused: {name} is of a kind a root filesystem does not hold")
                    size += member.size if member.isfile() else 0
        except tarfile.TarError as exc:
            raise InvalidInput(f"{path.name} is not a tar archive qrm can read ({exc})") from None
    if entries == 0:
        raise InvalidInput(f"{path.name} holds nothing")
    return ArchiveInfo(entries=entries, bytes=size, compression=compression)


def _check_path(name: str, what: str) -> None:
    if name.startswith("/"):
        raise InvalidInput(f"refused: {what} {name} has an absolute path")
    if ".." in PurePosixPath(name).parts:
        raise InvalidInput(f"refused: {what} {name} has a '..' part")
    if "\n" in name or "\x00" in name:
        raise InvalidInput(f"refused: {what} {name!r} has a control character in its name")
