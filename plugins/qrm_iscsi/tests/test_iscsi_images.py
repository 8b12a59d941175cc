"""Filling, snapshots, reverts and clones of iSCSI LUN files, with their data, on a real
tgtd reached over SSH: the files are read back out of the ext4 inside the LUN with
debugfs (no mount, no initiator needed for the data)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import IscsiLab

from qrm_core.plugin_api import DriverError, InvalidInput, NotFound

FILL_OPS = {"open_tree", "close_tree"}
SNAP_OPS = {"clone_volume", "snapshot_volume", "list_snapshots", "revert_volume", "remove_snapshot"}


def cat(image: Path, path: str) -> str:
    done = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True)
    return done.stdout


def fill(lab: IscsiLab, volume: str, files: dict[str, str]) -> str:
    driver, storage = lab.driver, lab.storage()
    tree = lab.on(lambda: driver.open_tree(storage, volume))
    for name, text in files.items():
        (Path(tree) / name).write_text(text)
    return str(lab.on(lambda: driver.close_tree(storage, volume, tree)))


def test_fill_snapshot_revert_clone(lab: IscsiLab) -> None:
    driver, storage = lab.driver, lab.storage()
    assert FILL_OPS | SNAP_OPS <= driver.supported_operations(storage)
    lab.on(lambda: driver.create_volume(storage, "img", 32))
    image = lab.backing / "img.img"
    said = fill(lab, "img", {"hello": "first\n"})
    assert said.startswith("an ext4 filesystem of 32 MB made from the files")
    assert cat(image, "/hello") == "first\n"
    assert not (lab.backing / ".qrm-fill" / "img").exists()  # the staging went
    inode = image.stat().st_ino
    assert lab.on(lambda: driver.snapshot_volume(storage, "img", "clean")) == "full copy"
    fill(lab, "img", {"hello": "second\n", "other": "x"})
    assert cat(image, "/hello") == "second\n"
    assert lab.on(lambda: driver.list_snapshots(storage, "img")) == ["clean"]
    assert lab.on(lambda: driver.revert_volume(storage, "img", "clean")) == "full copy"
    assert cat(image, "/hello") == "first\n" and cat(image, "/other") == ""
    assert image.stat().st_ino == inode  # tgt's open LUN file is the one reverted
    clone = lab.on(lambda: driver.clone_volume(storage, "img", "img2"))
    assert (clone.location, clone.size_mb, clone.how) == ("img2", 32, "full copy")
    assert cat(lab.backing / "img2.img", "/hello") == "first\n"
    assert f": {driver.target_name(storage, 'img2')}" in lab.tgt_show()
    lab.on(lambda: driver.remove_snapshot(storage, "img", "clean"))
    assert lab.on(lambda: driver.list_snapshots(storage, "img")) == []
    lab.on(lambda: driver.remove_volume(storage, "img2"))
    lab.on(lambda: driver.snapshot_volume(storage, "img", "again"))
    lab.on(lambda: driver.remove_volume(storage, "img"))
    assert not (lab.backing / ".qrm-snapshots" / "img").exists()


def test_files_too_large_for_the_volume_are_one_line(lab: IscsiLab) -> None:
    driver, storage = lab.driver, lab.storage()
    lab.on(lambda: driver.create_volume(storage, "tiny", 8))
    try:
        tree = lab.on(lambda: driver.open_tree(storage, "tiny"))
        (Path(tree) / "big").write_bytes(b"\1" * (12 << 20))
        with pytest.raises(DriverError, match="the 8 MB volume is too small for the files \\(13 MB\\)"):
            lab.on(lambda: driver.close_tree(storage, "tiny", tree))
        # The LUN still holds a clean, empty ext4.
        check = subprocess.run(["e2fsck", "-n", "-f", str(lab.backing / "tiny.img")], capture_output=True)
        assert check.returncode == 0
    finally:
        lab.on(lambda: driver.remove_volume(storage, "tiny"))


def test_bad_input_is_one_line_and_changes_nothing(lab: IscsiLab) -> None:
    driver, storage = lab.driver, lab.storage()
    lab.on(lambda: driver.create_volume(storage, "bad", 8))
    try:
        before = sorted(p.name for p in lab.backing.iterdir())
        for label in ("../x", "-rf", "a b", "", "x" * 65, "a;b"):
            with pytest.raises(InvalidInput):
                driver.snapshot_volume(storage, "bad", label)
        with pytest.raises(InvalidInput):
            driver.clone_volume(storage, "bad", "../evil")
        with pytest.raises(NotFound):
            lab.on(lambda: driver.revert_volume(storage, "bad", "nosuch"))
        with pytest.raises(NotFound):
            lab.on(lambda: driver.snapshot_volume(storage, "nosuch", "s"))
        with pytest.raises(NotFound):
            lab.on(lambda: driver.clone_volume(storage, "nosuch", "bad2"))
        with pytest.raises(InvalidInput):
            lab.on(lambda: driver.close_tree(storage, "bad", "/etc"))
        assert sorted(p.name for p in lab.backing.iterdir()) == before
    finally:
        lab.on(lambda: driver.remove_volume(storage, "bad"))


def test_lvm_volumes_do_not_offer_snapshots(lab: IscsiLab) -> None:
    driver = lab.driver
    storage = lab.storage(volume_group="vg0")
    assert not SNAP_OPS & driver.supported_operations(storage)
    assert FILL_OPS <= driver.supported_operations(storage)
    with pytest.raises(Exception, match="cannot snapshot volumes"):
        driver.snapshot_volume(storage, "img", "s")
