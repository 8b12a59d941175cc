"""NFS storage that this host cannot export from (nothing configured, ganesha
missing) is accepted with a warning, and a VE on it does not start."""

import pytest

from qrm_core.errors import Conflict
from qrm_core.services import boot_images, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.services.events import list_events


@pytest.mark.qrm_backends("sqlite")
def test_unconfigured_nfs_is_added_with_a_warning_and_refuses_ve_start(qrm_ctx, qrm_cli, monkeypatch) -> None:
    monkeypatch.delenv("QRM_NFS_EXPORT_ROOT", raising=False)
    added = storage.add_storage(qrm_ctx, name="nas", type="nfs", address="10.0.11.35")
    assert added.warning.startswith("NFS storage is not configured on this host; set QRM_NFS_EXPORT_ROOT")
    assert any(
        e.level == "warning" and "nas cannot export yet" in e.message for e in list_events(qrm_ctx, limit=5)
    )
    storage.add_filesystem_image(qrm_ctx, name="root", storage="nas", location="/srv/qrm/root")
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    with pytest.raises(
        Conflict, match="web cannot start: its filesystem image is on nas, which cannot export: NFS"
    ):
        ves.start_ve(qrm_ctx, "web")
    assert ves.show_ve(qrm_ctx, "web").desired_state == "stopped"
    qrm_ctx.rollback()  # the CLI below writes to the same SQLite file

    result = qrm_cli("storage", "add", "-n", "nas2", "-t", "nfs", "-i", "10.0.11.36")
    assert result.exit_code == 0, result
    assert "warning: nas2 cannot export yet: NFS storage is not configured on this host" in result.stderr
    result = qrm_cli("ve", "start", "web")
    assert result.exit_code != 0 and "cannot export" in result.stderr
