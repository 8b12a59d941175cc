"""A filesystem image cloned from one NFS storage server onto another: one on this
machine (an export root here), the other a machine of its own (a network namespace
with sshd) that qrm manages over SSH. The files go over as a tar stream through qrm's
machine; owners, modes and links arrive as they were, and back again. No ganesha is
needed: nothing is exported in these tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from qrm_core import remote
from qrm_core.errors import NotFound
from qrm_core.models import Event, FilesystemImage
from qrm_core.plugins import STORAGE_GROUP
from qrm_core.services import images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.testing import missing
from qrm_core.testkit import CaptureLab, make_root_tree, missing_storage_tools
from qrm_nfs import driver as nfs_driver
from qrm_nfs.driver import NfsStorage
from qrm_nfs.settings import NfsSettings


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaptureLab]:
    if os.geteuid() != 0:
        missing("root", "the remote storage server is a network namespace with its own sshd")
    absent = missing_storage_tools("nsenter", "unshare", "sshd", "ssh", "ssh-keygen", "tar")
    if absent:
        missing("OpenSSH and tar", f"apt-get install {' '.join(absent)}")
    lab = CaptureLab(tmp_path_factory.mktemp("nfsclone"))
    try:
        yield lab
    finally:
        lab.stop()


def files(root: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """Every entry: mode, owner, group, and its data (or link target)."""
    found: dict[str, tuple[int, int, int, bytes | str]] = {}
    for entry in sorted(root.rglob("*")):
        st = entry.lstat()
        data: bytes | str = (
            os.readlink(entry) if entry.is_symlink() else entry.read_bytes() if entry.is_file() else b""
        )
        found[str(entry.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, data)
    return found


def test_clone_onto_another_nfs_server_and_back(
    qrm_settings: Any, qrm_plugins: Any, lab: CaptureLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, there = tmp_path / "exports-here", tmp_path / "exports-there"
    here.mkdir()
    there.mkdir()
    qrm_plugins.add_driver(STORAGE_GROUP, NfsStorage(qrm_settings, NfsSettings(export_root=here)))

    def runner(settings: Any, storage: Any) -> Any:  # the test's machines are in the lab's network
        return lab.runner(
            remote.runner_for(settings.data_dir, storage.name, storage.address, storage.settings)
        )

    monkeypatch.setattr(images, "storage_runner", runner)
    monkeypatch.setattr(nfs_driver, "storage_runner", runner)
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        storage_service.add_storage(ctx, name="near", type="nfs", address="10.0.11.35")
        storage_service.add_storage(
            ctx, name="far", type="nfs", address=lab.storage.address, settings={"export_root": str(there)},
            ssh=storage_service.SshChange(user="root", key=lab.storage_key.read_text()), check=False,
        )  # fmt: skip
        storage_service.add_filesystem_image(ctx, name="web", storage="near", size_mb=64)
    remote.pin_host_key(qrm_settings.data_dir, "far", lab.storage.address, 22, lab.storage_known)
    make_root_tree(here / "web", data_mb=3)
    os.link(here / "web" / "srv" / "data" / "blob000", here / "web" / "blob-link")
    original = files(here / "web")

    lines: list[str] = []
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        far = images.clone_filesystem_image(ctx, "web", name="web-far", storage="far", progress=lines.append)
    assert (far.storage, far.location, far.state, far.size_mb) == ("far", f"{there}/web-far", "ready", 64)
    assert files(there / "web-far") == original
    assert (there / "web-far" / "blob-link").stat().st_ino == (
        there / "web-far" / "srv" / "data" / "blob000"
    ).stat().st_ino
    assert any(line.startswith("copying web to far: 3.") and "%), " in line for line in lines), lines
    assert lines[-2].startswith("copied 3.") and lines[-1] == "making the image from the copied files"

    # And back, from the server managed over SSH to this one.
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        back = images.clone_filesystem_image(ctx, "web-far", name="web-back", storage="near")
        said = [e.message for e in ctx.session.exec(select(Event).order_by(Event.id)).all()]
    assert back.location == f"{here}/web-back" and files(here / "web-back") == original
    assert any(
        m.startswith("filesystem image web-back cloned from web-far on far") and "files in place" in m
        for m in said
    ), said

    # A source volume that went away behind qrm's back: one line, nothing left on the other server.
    (there / "web-far").rename(there / "gone")
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx, pytest.raises(NotFound) as info:
        images.clone_filesystem_image(ctx, "web-far", name="web-again", storage="near")
    assert str(info.value) == f"volume {there}/web-far does not exist on far"
    assert not (here / "web-again").exists()
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        names = ctx.session.exec(select(FilesystemImage.name).order_by(FilesystemImage.name)).all()
    assert names == ["web", "web-back", "web-far"]
