"""Deterministic root filesystem archives, unpacked by busybox tar (what the node agent runs)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from qrm_core.errors import InvalidInput
from qrm_core.testing import missing
from qrm_ramdisk.archive import SKELETON_DIRS, create_archive, create_skeleton, member_modes

BUSYBOX = "/bin/busybox"


def make_tree(root: Path) -> Path:
    (root / "etc" / "qrm").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "etc" / "hostname").write_text("web\n")
    start = root / "etc" / "qrm" / "ve-start"
    start.write_text("#!/bin/sh\necho started\n")
    start.chmod(0o750)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "var" / "lib" / "big").mkdir(parents=True)
    (root / "var" / "lib" / "big" / "data").write_bytes(os.urandom(300_000))
    (root / "z-empty").write_bytes(b"")
    os.mkfifo(root / "run-fifo")
    for path in [*root.rglob("*"), root]:
        os.utime(path, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    return root


def unpack_with_busybox(archive: Path, into: Path) -> Path:
    if not Path(BUSYBOX).is_file():
        missing("busybox-static", "apt-get install busybox-static")
    into.mkdir()
    subprocess.run([BUSYBOX, "tar", "-xzf", str(archive), "-C", str(into)], check=True, capture_output=True)
    return into


def test_same_tree_same_bytes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    create_archive(tree, tmp_path / "a.tar.gz")
    create_archive(tree, tmp_path / "b.tar.gz")
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    os.utime(tree / "etc" / "hostname", (1_700_000_001, 1_700_000_001))
    create_archive(tree, tmp_path / "c.tar.gz")
    assert (tmp_path / "c.tar.gz").read_bytes() != (tmp_path / "a.tar.gz").read_bytes()


def test_a_tarball_of_the_tree_gives_the_same_archive(tmp_path: Path) -> None:
    """GNU tar packs the tree (with ./ names, user names, its own order, xz): after
    import it is byte for byte what importing the directory gives."""
    if shutil.which("tar") is None:
        missing("GNU tar", "apt-get install tar")
    tree = make_tree(tmp_path / "tree")
    subprocess.run(["tar", "-C", str(tree), "-cJf", str(tmp_path / "in.tar.xz"), "."], check=True)
    create_archive(tree, tmp_path / "from-dir.tar.gz")
    create_archive(tmp_path / "in.tar.xz", tmp_path / "from-tar.tar.gz")
    assert (tmp_path / "from-tar.tar.gz").read_bytes() == (tmp_path / "from-dir.tar.gz").read_bytes()


def test_busybox_unpacks_it_faithfully(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    os.link(tree / "etc" / "hostname", tree / "etc" / "hostname.link")
    create_archive(tree, tmp_path / "root.tar.gz")
    out = unpack_with_busybox(tmp_path / "root.tar.gz", tmp_path / "out")
    assert (out / "etc" / "hostname").read_text() == "web\n"
    assert os.path.samefile(out / "etc" / "hostname", out / "etc" / "hostname.link")
    assert stat.S_IMODE((out / "etc" / "qrm" / "ve-start").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    assert os.readlink(out / "bin" / "sh") == "busybox"
    assert stat.S_ISFIFO((out / "run-fifo").lstat().st_mode)
    assert (out / "var" / "lib" / "big" / "data").read_bytes() == (
        tree / "var" / "lib" / "big" / "data"
    ).read_bytes()
    assert int((out / "etc" / "hostname").stat().st_mtime) == 1_700_000_000
    names = member_modes(tmp_path / "root.tar.gz")
    assert list(names) == sorted(names, key=lambda n: n.split("/"))
    with tarfile.open(tmp_path / "root.tar.gz") as tar:
        assert {m.uname for m in tar.getmembers()} == {""}
        assert {m.uid for m in tar.getmembers()} == {os.getuid()}


def test_the_skeleton_is_a_root(tmp_path: Path) -> None:
    create_skeleton(tmp_path / "s.tar.gz", hostname="scratch")
    out = unpack_with_busybox(tmp_path / "s.tar.gz", tmp_path / "out")
    for name, mode in SKELETON_DIRS:
        assert (out / name).is_dir() and stat.S_IMODE((out / name).stat().st_mode) == mode, name
    assert (out / "etc" / "hostname").read_text() == "scratch\n"
    create_skeleton(tmp_path / "t.tar.gz", hostname="scratch")
    assert (tmp_path / "s.tar.gz").read_bytes() == (tmp_path / "t.tar.gz").read_bytes()


def tarball(path: Path, members: list[tuple[str, str, str]]) -> Path:
    """A tar with members (name, kind, data or link target), written with Python's tarfile."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value.encode()))
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, value
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
    return path


@pytest.mark.parametrize(
    ("members", "error"),
    [
        ([("/etc/passwd", "file", "x")], "absolute path"),
        ([("../../etc/passwd", "file", "x")], "leaves the archive root"),
        ([("a/../../b", "file", "x")], "leaves the archive root"),
        ([("a", "file", "x"), ("b", "hardlink", "../../etc/shadow")], "leaves the archive root"),
        ([("b", "hardlink", "nowhere")], "points outside the archive"),
    ],
)
def test_hostile_tarballs_are_refused(tmp_path: Path, members, error: str) -> None:
    with pytest.raises(InvalidInput, match=error):
        create_archive(tarball(tmp_path / "in.tar.gz", members), tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()
    assert not list(tmp_path.glob(".out.tar.gz.tmp*"))


def test_symlinks_may_point_anywhere_and_parents_are_added(tmp_path: Path) -> None:
    """An absolute symlink is normal in a root filesystem (it resolves inside the VE)."""
    source = tarball(
        tmp_path / "in.tar.gz",
        [
            ("usr/bin/sh", "symlink", "/bin/busybox"),
            ("deep/er/file", "file", "x"),
            ("b", "hardlink", "deep/er/file"),
        ],
    )
    create_archive(source, tmp_path / "out.tar.gz")
    names = list(member_modes(tmp_path / "out.tar.gz"))
    assert names == ["deep", "deep/er", "deep/er/file", "usr", "usr/bin", "usr/bin/sh", "b"]
    out = unpack_with_busybox(tmp_path / "out.tar.gz", tmp_path / "out")
    assert os.readlink(out / "usr" / "bin" / "sh") == "/bin/busybox"
    assert (out / "b").read_text() == "x"


def test_unreadable_input_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive at all" * 40)
    with pytest.raises(InvalidInput, match="is not a readable tar archive"):
        create_archive(junk, tmp_path / "out.tar.gz")
    with pytest.raises(InvalidInput, match="is not a file"):
        create_archive(tmp_path / "missing.tar", tmp_path / "out.tar.gz")
