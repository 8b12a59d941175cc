"""A running machine captured into an NFS image over SSH + rsync, and a pristine VE on it
given back what it started with (``qrm ve reset``), with the volume's real files: the
machine is a network namespace with its own sshd; the NFS driver manages an export
root here (no ganesha needed: nothing is exported in these tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qrm_core import remote
from qrm_core.errors import InUse
from qrm_core.plugins import STORAGE_GROUP
from qrm_core.services import boot_images, images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import missing
from qrm_core.testkit import CaptureLab, make_root_tree, missing_storage_tools
from qrm_nfs.driver import NfsStorage
from qrm_nfs.settings import NfsSettings


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CaptureLab, Path]]:
    if os.geteuid() != 0:
        missing("root", "the capture tests run sshd in network namespaces")
    absent = missing_storage_tools("nsenter", "unshare", "sshd", "ssh", "ssh-keygen", "rsync")
    if absent:
        missing("OpenSSH and rsync", f"apt-get install {' '.join(absent)}")
    work = tmp_path_factory.mktemp("nfscapture")
    root = make_root_tree(work / "machine-root", data_mb=4)
    lab = CaptureLab(work)
    try:
        yield lab, root
    finally:
        lab.stop()


@pytest.fixture
def site(
    qrm_settings: Any,
    qrm_plugins: Any,
    machine: tuple[CaptureLab, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Any, Any, Path]]:
    lab, _ = machine
    export_root = tmp_path / "exports"
    export_root.mkdir()
    qrm_plugins.add_driver(STORAGE_GROUP, NfsStorage(qrm_settings, NfsSettings(export_root=export_root)))

    def runner(settings: Any, storage: Any) -> Any:
        return lab.runner(
            remote.runner_for(settings.data_dir, storage.name, storage.address, storage.settings)
        )

    monkeypatch.setattr(images, "storage_runner", runner)
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        storage_service.add_storage(ctx, name="nfs1", type="nfs", address="10.0.11.35")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1.0")
    yield qrm_settings, qrm_plugins, export_root


def files(root: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(root)): os.readlink(p)
        if p.is_symlink()
        else p.read_bytes()
        if p.is_file()
        else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_capture_then_reset_a_pristine_ve(
    site: tuple[Any, Any, Path], machine: tuple[CaptureLab, Path]
) -> None:
    settings, plugins, export_root = site
    lab, root = machine
    with service_context(settings, plugins=plugins) as ctx:
        image = images.capture_filesystem_image(
            ctx, name="fc6", storage="nfs1", source=f"root@{lab.source.address}:{root}/",
            identity=lab.source_key.read_text(),
        )  # fmt: skip
    volume = Path(image.location)
    assert volume == export_root / "fc6" and image.state == "ready"
    assert (volume / "home/alice/notes").read_text() == "alice's notes\n"  # a file of the machine
    assert (volume / "etc/machine-id").read_text() == "" and not (
        volume / "etc/ssh/ssh_host_ed25519_key"
    ).exists()
    assert not list((volume / "proc").iterdir())
    with service_context(settings, plugins=plugins) as ctx:
        ves.create_ve(ctx, name="team", boot_image="idle", fs_image="fc6", pristine=True)
        ves.start_ve(ctx, "team")
    first = files(volume)
    # The team plays around: writes, deletes, breaks things.
    (volume / "home/alice/notes").write_text("scribbled over\n")
    (volume / "usr/bin/tool").unlink()
    (volume / "etc/new-config").write_text("risky\n")
    with service_context(settings, plugins=plugins) as ctx, pytest.raises(InUse, match="team is using it"):
        images.revert_filesystem_image(ctx, "fc6", label=images.PRISTINE_LABEL)
    with service_context(settings, plugins=plugins) as ctx:
        result = images.reset_ve(ctx, "team", poll=0.05)
    assert result.desired_state == "running"
    assert files(volume) == first
    assert (volume / "usr/bin/tool").stat().st_ino == (volume / "usr/bin/tool-link").stat().st_ino
