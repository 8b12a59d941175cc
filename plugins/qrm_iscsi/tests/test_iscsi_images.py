"""Filling, snapshots, reverts and clones of iSCSI LUN files, with their data, on a real
tgtd reached over SSH: the files are read back out of the ext4 inside the LUN with
debugfs (no mount, no initiator needed for the data). Reading a volume's files for a
clone onto another storage server (read_tree: the ext4 mounted read-only on the storage
host, in its own mount namespace; release_tree) and such a clone through the services."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ADDRESS, IscsiLab

from qrm_core import remote
from qrm_core.errors import InUse
from qrm_core.plugin_api import DriverError, InvalidInput, NotFound
from qrm_core.plugins import STORAGE_GROUP
from qrm_core.services import boot_images, images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.services import virtual_environments as ves
from qrm_core.testkit import RunnerInNetns

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


def test_lvm_volumes_offer_snapshots(lab: IscsiLab) -> None:
    """LVM snapshots, reverts and dd clones (test_iscsi_lvm.py exercises them)."""
    driver = lab.driver
    storage = lab.storage(volume_group="vg0")
    assert SNAP_OPS <= driver.supported_operations(storage)
    assert FILL_OPS <= driver.supported_operations(storage)


# -- reading a volume's files (read_tree, release_tree) ---------------------------


def fill_special(lab: IscsiLab, volume: str) -> None:
    """Files that a copy easily loses: a hard link, a setuid file of another owner, a
    symbolic link, a fifo, a device node."""
    driver, storage = lab.driver, lab.storage()
    tree = Path(lab.on(lambda: driver.open_tree(storage, volume)))
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_text("web1\n")
    (tree / "data").write_bytes(b"\xa5" * (1 << 20))
    os.link(tree / "data", tree / "data-link")
    (tree / "etc" / "link").symlink_to("../data")
    tool = tree / "tool"
    tool.write_text("#!/bin/sh\n")
    os.chown(tool, 1234, 2345)
    tool.chmod(0o4755)  # after chown, which clears it
    os.mkfifo(tree / "fifo")
    os.mknod(tree / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    lab.on(lambda: driver.close_tree(storage, volume, str(tree)))


def check_special(root: Path) -> None:
    assert (root / "etc" / "hostname").read_text() == "web1\n"
    assert (root / "data").read_bytes() == b"\xa5" * (1 << 20)
    data, link = (root / "data").stat(), (root / "data-link").stat()
    assert data.st_ino == link.st_ino and data.st_nlink == 2  # still one file
    assert os.readlink(root / "etc" / "link") == "../data"
    tool = (root / "tool").stat()
    assert (tool.st_uid, tool.st_gid, stat.S_IMODE(tool.st_mode)) == (1234, 2345, 0o4755)
    assert stat.S_ISFIFO((root / "fifo").lstat().st_mode)
    null = (root / "null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)


def on_host(lab: IscsiLab, path: str) -> Path:
    """``path`` as the storage host's processes see it (its own mount namespace)."""
    return Path(f"/proc/{lab.host.holder.pid}/root{path}")


def mounts_on(lab: IscsiLab, path: str) -> list[str]:
    """The options of every mount on ``path`` in the storage host's mount namespace."""
    lines = Path(f"/proc/{lab.host.holder.pid}/mountinfo").read_text().splitlines()
    return [line.split()[5] for line in lines if line.split()[4] == path]


def loops_of(image: Path) -> list[str]:
    """The loop devices attached to ``image`` (loop devices are the machine's, not a namespace's)."""
    done = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_tree_mounts_the_volume_read_only_and_release_tree_unmounts_it(lab: IscsiLab) -> None:
    driver, storage = lab.driver, lab.storage()
    assert "read_tree" in driver.supported_operations(storage)
    assert "read_tree" in driver.supported_operations(lab.storage(volume_group="vg0"))
    lab.on(lambda: driver.create_volume(storage, "rd", 32))
    image = lab.backing / "rd.img"
    try:
        fill_special(lab, "rd")
        before = digest(image)
        tree = lab.on(lambda: driver.read_tree(storage, "rd"))
        assert tree == f"{lab.backing}/.qrm-read/rd"
        (options,) = mounts_on(lab, tree)
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(options.split(","))
        assert len(loops_of(image)) == 1
        check_special(on_host(lab, tree))
        assert not os.path.ismount(tree)  # the mount is the storage host's alone
        # Read-only: the storage host itself cannot write there.
        assert lab.host.run("touch", f"{tree}/new", check=False).returncode != 0
        # A mount left by a clone that was interrupted: unmounted first, never stacked.
        assert lab.on(lambda: driver.read_tree(storage, "rd")) == tree
        assert len(mounts_on(lab, tree)) == 1 and len(loops_of(image)) == 1
        lab.on(lambda: driver.release_tree(storage, "rd", tree))
        assert mounts_on(lab, tree) == [] and loops_of(image) == []
        assert not on_host(lab, tree).exists()
        lab.on(lambda: driver.release_tree(storage, "rd", tree))  # again: nothing to do
        assert digest(image) == before  # nothing was written to the volume
        with pytest.raises(InvalidInput):
            driver.release_tree(storage, "rd", "/etc")
        # A volume removed while a crashed clone still had it mounted: unmounted first.
        lab.on(lambda: driver.read_tree(storage, "rd"))
    finally:
        lab.on(lambda: driver.remove_volume(storage, "rd"))
    assert mounts_on(lab, tree) == [] and loops_of(image) == [] and not image.exists()


def test_read_tree_of_a_missing_or_broken_volume(lab: IscsiLab) -> None:
    driver, storage = lab.driver, lab.storage()
    with pytest.raises(NotFound, match=r"^volume nosuch does not exist on st$"):
        lab.on(lambda: driver.read_tree(storage, "nosuch"))
    with pytest.raises(InvalidInput):
        driver.read_tree(storage, "../evil")
    lab.on(lambda: driver.create_volume(storage, "junk", 8))
    image = lab.backing / "junk.img"
    try:
        image.write_bytes(b"\0" * (8 << 20))  # no filesystem any more
        with pytest.raises(DriverError) as info:
            lab.on(lambda: driver.read_tree(storage, "junk"))
        said = str(info.value)
        assert said.startswith(
            f"iSCSI storage st (root@{ADDRESS}): cannot mount volume junk read-only: mount:"
        )
        assert "\n" not in said
        tree = f"{lab.backing}/.qrm-read/junk"
        assert mounts_on(lab, tree) == [] and loops_of(image) == [] and not on_host(lab, tree).exists()
    finally:
        lab.on(lambda: driver.remove_volume(storage, "junk"))


@pytest.fixture
def site(
    qrm_settings: Any, qrm_plugins: Any, lab: IscsiLab, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any]:
    """The iSCSI storage host as storage server ``st`` (over SSH) and core's fake storage
    as ``other`` (its volumes are directories on this machine)."""
    from qrm_iscsi import driver as iscsi_driver
    from qrm_iscsi.driver import IscsiStorage

    qrm_plugins.add_driver(STORAGE_GROUP, IscsiStorage(qrm_settings, lab.iscsi))

    def runner(settings: Any, storage: Any) -> Any:
        inner = remote.runner_for(settings.data_dir, storage.name, storage.address, storage.settings)
        return RunnerInNetns(lab.host.netns, inner)

    monkeypatch.setattr(images, "storage_runner", runner)
    monkeypatch.setattr(iscsi_driver, "storage_runner", runner)
    ssh = storage_service.SshChange(
        user="root", key=lab.user_key.read_text(), host_key=lab.known_host.split(None, 1)[1]
    )
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="iscsi", address=ADDRESS, ssh=ssh, check=False)
        storage_service.add_storage(ctx, name="other", type="fake", address="10.0.11.36")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1.0")
    return qrm_settings, qrm_plugins


@pytest.mark.qrm_backends("sqlite")  # the copy is the services' and the driver's; every DB in core
def test_clone_from_an_iscsi_image_onto_another_storage_server(site: tuple[Any, Any], lab: IscsiLab) -> None:
    settings, plugins = site
    with service_context(settings, plugins=plugins) as ctx:
        storage_service.add_filesystem_image(ctx, name="web", storage="st", size_mb=32)
    fill_special(lab, "web")
    image = lab.backing / "web.img"
    lines: list[str] = []
    try:
        with service_context(settings, plugins=plugins) as ctx:
            made = images.clone_filesystem_image(
                ctx, "web", name="web2", storage="other", progress=lines.append
            )
        assert (made.storage, made.state, made.source, made.size_mb) == ("other", "ready", "clone of web", 32)
        check_special(settings.state_dir / "fake-storage" / "other.trees" / made.location.strip("/"))
        assert any(line.startswith("copied ") for line in lines), lines
        tree = f"{lab.backing}/.qrm-read/web"
        assert mounts_on(lab, tree) == [] and loops_of(image) == [] and not on_host(lab, tree).exists()
        # A VE that uses the image: no clone (core's rule), nothing mounted for it.
        with service_context(settings, plugins=plugins) as ctx:
            ves.create_ve(ctx, name="team", boot_image="idle", fs_image="web")
            ves.start_ve(ctx, "team")
        with (
            service_context(settings, plugins=plugins) as ctx,
            pytest.raises(InUse, match="team is using it"),
        ):
            images.clone_filesystem_image(ctx, "web", name="web3", storage="other")
        assert mounts_on(lab, tree) == []
    finally:
        with service_context(settings, plugins=plugins) as ctx:
            if ves.list_ves(ctx):
                ves.stop_ve(ctx, "team")
                ves.remove_ve(ctx, "team")
            storage_service.remove_filesystem_image(ctx, "web", purge=True)
