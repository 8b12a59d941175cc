"""A running machine captured into an iSCSI image on a storage server qrm manages over
SSH: the rsync runs on the storage server (it logs in to the machine from there) into a
staging directory, and the LUN gets an ext4 filesystem made from it; read back with
debugfs. The "machine" is the storage host's own sshd serving a prepared root tree (the
storage host's network namespace is the one the machine must be reachable from)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ADDRESS, IscsiLab

from qrm_core import remote
from qrm_core.errors import DriverError
from qrm_core.plugins import STORAGE_GROUP
from qrm_core.services import images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.testkit import RunnerInNetns, make_root_tree


def cat(image: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True).stdout


@pytest.fixture
def site(
    qrm_settings: Any, qrm_plugins: Any, lab: IscsiLab, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any]:
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
    return qrm_settings, qrm_plugins


@pytest.mark.qrm_backends("sqlite")  # one LUN directory for the module; services: every DB in core
def test_capture_into_a_lun_from_the_storage_server(
    site: tuple[Any, Any], lab: IscsiLab, tmp_path: Path
) -> None:
    settings, plugins = site
    root = make_root_tree(tmp_path / "machine-root", data_mb=2)
    before = lab.host.log("sshd").count(f"from {ADDRESS}")
    with service_context(settings, plugins=plugins) as ctx:
        image = images.capture_filesystem_image(
            ctx, name="node1", storage="st", source=f"root@{ADDRESS}:{root}/",
            identity=lab.user_key.read_text(), size_mb=64,
        )  # fmt: skip
    assert (image.state, image.location) == ("ready", "node1")
    # The machine was logged in to from the storage server's address: rsync ran there.
    assert lab.host.log("sshd").count(f"from {ADDRESS}") > before
    lun = lab.backing / "node1.img"
    assert cat(lun, "/home/alice/notes") == "alice's notes\n"
    assert cat(lun, "/etc/hostname") == "node1\n" and cat(lun, "/etc/machine-id") == ""
    assert cat(lun, "/etc/ssh/ssh_host_ed25519_key") == ""
    assert not (lab.backing / ".qrm-fill" / "node1").exists()
    stat = subprocess.run(
        ["debugfs", "-R", "stat /home/alice/notes", str(lun)], capture_output=True, text=True
    )
    assert "User:  1234   Group:  2345" in stat.stdout


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_a_volume_too_small_leaves_nothing(site: tuple[Any, Any], lab: IscsiLab, tmp_path: Path) -> None:
    settings, plugins = site
    root = make_root_tree(tmp_path / "machine-root", data_mb=12)
    with service_context(settings, plugins=plugins) as ctx, pytest.raises(DriverError) as info:
        images.capture_filesystem_image(
            ctx, name="small", storage="st", source=f"root@{ADDRESS}:{root}/",
            identity=lab.user_key.read_text(), size_mb=8,
        )  # fmt: skip
    assert "the 8 MB volume is too small for the files" in str(info.value) and "\n" not in str(info.value)
    with service_context(settings, plugins=plugins) as ctx:
        assert storage_service.list_filesystem_images(ctx) == []
    assert not (lab.backing / "small.img").exists()
    assert not (lab.backing / ".qrm-fill" / "small").exists()
