"""Clones, snapshots, reverts and filling of NFS volumes, with their data: on this disk
(ext4: full copies) and on an XFS with reflink (copy-on-write). No ganesha needed:
these operations touch the volumes' directories only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrm_core.config import Settings
from qrm_core.drivers.base import StorageTarget
from qrm_core.errors import DriverError, InvalidInput, NotFound
from qrm_core.testkit import reflink_filesystem
from qrm_nfs.driver import NfsStorage
from qrm_nfs.settings import NfsSettings

STORAGE = StorageTarget(name="NFS", type="nfs", address="10.0.11.35")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("QRM_NFS_") or key == "QRM_CONFIG":
            monkeypatch.delenv(key)


@pytest.fixture(params=["ext4", "xfs-reflink"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[NfsStorage, str]]:
    core = Settings(data_dir=tmp_path / "data")
    if request.param == "ext4":
        root = tmp_path / "exports"
        root.mkdir()
        yield NfsStorage(core, NfsSettings(export_root=root)), "full copy"
        return
    with reflink_filesystem(tmp_path) as mount:
        root = mount / "exports"
        root.mkdir()
        yield NfsStorage(core, NfsSettings(export_root=root)), "copy-on-write"


def fill(path: Path) -> None:
    (path / "etc").mkdir()
    (path / "etc" / "hostname").write_text("web1\n")
    (path / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    os.link(path / "big", path / "big-link")
    (path / "etc" / "link").symlink_to("../big")
    (path / "secret").write_text("s")
    (path / "secret").chmod(0o600)
    os.chown(path / "secret", 1234, 2345)


def tree(path: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """Every entry: mode, owner, group, and its data (or link target)."""
    found = {}
    for entry in sorted(path.rglob("*")):
        st = entry.lstat()
        data: bytes | str = (
            os.readlink(entry) if entry.is_symlink() else entry.read_bytes() if entry.is_file() else b""
        )
        found[str(entry.relative_to(path))] = (st.st_mode, st.st_uid, st.st_gid, data)
    return found


def test_snapshot_change_revert_gives_the_data_back(backend: tuple[NfsStorage, str]) -> None:
    driver, how = backend
    if os.geteuid() != 0:
        pytest.skip("chown of test files needs root")
    location = driver.create_volume(STORAGE, "web", 10).location
    volume = Path(location)
    fill(volume)
    before = tree(volume)
    assert driver.snapshot_volume(STORAGE, location, "first") == how
    (volume / "etc" / "hostname").write_text("changed\n")
    (volume / "big").unlink()
    (volume / "new").write_text("new")
    assert driver.snapshot_volume(STORAGE, location, "second") == how
    assert driver.list_snapshots(STORAGE, location) == ["first", "second"]
    inode = volume.stat().st_ino
    assert driver.revert_volume(STORAGE, location, "first") == how
    assert tree(volume) == before
    assert volume.stat().st_ino == inode  # the exported directory itself stays
    assert (volume / "big").stat().st_nlink == 2  # hard links stay hard links
    driver.revert_volume(STORAGE, location, "second")
    assert (volume / "new").read_text() == "new" and not (volume / "big").exists()
    driver.remove_snapshot(STORAGE, location, "second")
    assert driver.list_snapshots(STORAGE, location) == ["first"]
    # Nothing of the snapshots is a volume, and they go with their volume.
    assert [v.location for v in driver.list_volumes(STORAGE)] == [location]
    driver.remove_volume(STORAGE, location)
    assert not (volume.parent / ".qrm-snapshots" / "web").exists()


def test_clone_copies_the_data(backend: tuple[NfsStorage, str]) -> None:
    driver, how = backend
    location = driver.create_volume(STORAGE, "web", 10).location
    (Path(location) / "file").write_text("data")
    clone = driver.clone_volume(STORAGE, location, "web2")
    assert clone.how == how and clone.location.endswith("/web2")
    assert (Path(clone.location) / "file").read_text() == "data"
    (Path(clone.location) / "file").write_text("other")
    assert (Path(location) / "file").read_text() == "data"
    with pytest.raises(DriverError, match="already exists"):
        driver.clone_volume(STORAGE, location, "web2")


def test_bad_input_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "exports"
    root.mkdir()
    driver = NfsStorage(Settings(data_dir=tmp_path / "data"), NfsSettings(export_root=root))
    location = driver.create_volume(STORAGE, "web", 10).location
    (Path(location) / "file").write_text("data")
    for label in ("../x", "-rf", "a b", "", ".hidden", "x" * 65, "a;b"):
        with pytest.raises(InvalidInput):
            driver.snapshot_volume(STORAGE, location, label)
    for name in ("../x", "-rf", "a/b", ""):
        with pytest.raises(InvalidInput):
            driver.clone_volume(STORAGE, location, name)
    with pytest.raises(NotFound):
        driver.revert_volume(STORAGE, location, "nosuch")
    with pytest.raises(NotFound):
        driver.snapshot_volume(STORAGE, str(root / "missing"), "s")
    with pytest.raises(InvalidInput):
        driver.snapshot_volume(STORAGE, "/etc", "s")
    driver.snapshot_volume(STORAGE, location, "s")
    with pytest.raises(DriverError, match="already has a snapshot"):
        driver.snapshot_volume(STORAGE, location, "s")
    assert sorted(p.name for p in root.iterdir()) == [
        ".qrm-nfs.json",
        ".qrm-nfs.lock",
        ".qrm-snapshots",
        "web",
    ]
    assert (Path(location) / "file").read_text() == "data"


def test_the_tree_of_a_volume_is_its_directory(tmp_path: Path) -> None:
    root = tmp_path / "exports"
    root.mkdir()
    driver = NfsStorage(Settings(data_dir=tmp_path / "data"), NfsSettings(export_root=root))
    location = driver.create_volume(STORAGE, "web", 10).location
    assert driver.open_tree(STORAGE, location) == location
    (Path(location) / "f").write_bytes(b"x" * 2_000_000)
    assert "NFS directory (2 MB)" in driver.close_tree(STORAGE, location, location)
    with pytest.raises(NotFound):
        driver.open_tree(STORAGE, str(root / "gone"))
