"""The deterministic newc writer, checked against GNU cpio (the real tool) and the kernel's rules."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from qrm_core.bootimage.cpio import Archive, read_newc, write_gzip
from qrm_core.errors import InvalidInput
from qrm_core.testing import missing


def sample(tmp_path: Path, *, order: str = "forward", extra: bytes = b"") -> Archive:
    src = tmp_path / "big.bin"
    if not src.exists():
        src.write_bytes(bytes(range(256)) * 4099)
    archive = Archive()
    steps = [
        lambda: archive.add_file("bin/busybox", source=src, mode=0o755),
        lambda: archive.add_symlink("bin/sh", "/bin/busybox"),
        lambda: archive.add_file("init", data=b"#!/bin/sh\necho hi\n" + extra, mode=0o755),
        lambda: archive.add_device("dev/console", "c", 5, 1),
        lambda: archive.add_dir("tmp", 0o1777),
        lambda: archive.add_file("etc/qrm/release", data=b"kernel=x\n"),
    ]
    for step in steps if order == "forward" else reversed(steps):
        step()
    return archive


def test_same_description_same_bytes_whatever_the_order(tmp_path: Path) -> None:
    a, b = io.BytesIO(), io.BytesIO()
    sample(tmp_path).write(a)
    sample(tmp_path, order="reverse").write(b)
    assert a.getvalue() == b.getvalue()
    assert len(a.getvalue()) % 512 == 0
    c = io.BytesIO()
    sample(tmp_path, extra=b"#").write(c)
    assert c.getvalue() != a.getvalue()


def test_gzip_is_reproducible_and_carries_no_name_or_time(tmp_path: Path) -> None:
    one, two = tmp_path / "one.gz", tmp_path / "two.gz"
    write_gzip(sample(tmp_path), one)
    write_gzip(sample(tmp_path, order="reverse"), two)
    assert hashlib.sha256(one.read_bytes()).digest() == hashlib.sha256(two.read_bytes()).digest()
    header = one.read_bytes()[:10]
    assert header[3] == 0  # FLG: no FNAME, no FCOMMENT
    assert header[4:8] == b"\0\0\0\0"  # MTIME 0


def test_entries_are_sorted_parents_first_with_fixed_metadata(tmp_path: Path) -> None:
    data = io.BytesIO()
    sample(tmp_path).write(data)
    entries = read_newc(data.getvalue())
    names = [name for name, _, _ in entries]
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert names.index("etc") < names.index("etc/qrm") < names.index("etc/qrm/release")
    raw = data.getvalue()
    # Every header: uid/gid 0, mtime 0, inode = position.
    pos, inode = 0, 1
    while raw[pos : pos + 6] == b"070701":
        fields = [int(raw[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        name_len, size = fields[11], fields[6]
        name = raw[pos + 110 : pos + 110 + name_len - 1].decode()
        if name == "TRAILER!!!":
            break
        assert fields[0] == inode and fields[2] == 0 and fields[3] == 0 and fields[5] == 0
        inode += 1
        pos += 110 + name_len
        pos += (-pos) % 4
        pos += size + (-size) % 4


def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    """cpio(1) lists and extracts the archive: links, modes and device numbers intact."""
    if shutil.which("cpio") is None:
        missing("cpio", "apt-get install cpio")
    data = io.BytesIO()
    sample(tmp_path).write(data)
    listing = subprocess.run(
        ["cpio", "-t", "-v", "--quiet"], input=data.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    assert "bin/sh -> /bin/busybox" in listing
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------") and " 5, " in console
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"],
        input=data.getvalue(),
        cwd=out,
        capture_output=True,
        check=True,
    )
    assert (out / "bin/busybox").read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    assert (out / "bin/sh").is_symlink() and str((out / "bin/sh").readlink()) == "/bin/busybox"
    assert gzip.decompress(gzip.compress(data.getvalue())) == data.getvalue()


@pytest.mark.parametrize("bad", ["", "/", "..", "a/../../b", "x\0y"])
def test_paths_cannot_escape_or_be_empty(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidInput):
        Archive().add_file(bad, data=b"x")


def test_conflicts_are_refused(tmp_path: Path) -> None:
    archive = Archive()
    archive.add_file("a", data=b"1")
    archive.add_file("a", data=b"1")  # the same thing twice is fine
    with pytest.raises(InvalidInput, match="twice"):
        archive.add_file("a", data=b"2")
    with pytest.raises(InvalidInput, match="not a directory"):
        archive.add_file("a/b", data=b"1")
