"""openQRM's commands, as written, with qrm-nfs installed (entry points discovered for real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrm_core.config import Settings
from qrm_core.context import HookContext
from qrm_nfs import plugin
from qrm_nfs.service import GaneshaService


@pytest.fixture
def export_root(qrm_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "exports"
    root.mkdir()
    monkeypatch.setenv("QRM_NFS_EXPORT_ROOT", str(root))
    monkeypatch.setenv("QRM_NFS_GANESHA_CONFIG", str(tmp_path / "qrm-exports.conf"))
    return root


def _ok(result) -> None:
    assert result.exit_code == 0, result.stderr


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.stdout
    assert result.stderr.strip() and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_openqrm_storage_add_as_written(qrm_cli, export_root: Path) -> None:
    _ok(qrm_cli("init"))
    r = qrm_cli("storage", "add", "-n", "NFS", "-t", "NFS", "-i", "10.0.11.35", "-c", "QRMSRC")
    _ok(r)
    assert "added storage server NFS (nfs at 10.0.11.35)" in r.stdout
    show = qrm_cli("storage", "show", "NFS", "-o", "json").json()
    assert show["type"] == "nfs" and show["comment"] == "QRMSRC"

    # --size creates a real directory volume.
    _ok(qrm_cli("filesystem-image", "add", "-n", "web", "-s", "NFS", "--size", "64"))
    assert (export_root / "web").is_dir()
    image = qrm_cli("filesystem-image", "show", "web", "-o", "json").json()
    assert image["location"] == str(export_root / "web")

    # -l imports an existing directory, and only that.
    assert "not an existing directory" in _one_line_error(
        qrm_cli("filesystem-image", "add", "-n", "centos", "-s", "NFS", "-l", str(export_root / "centos"))
    )
    (export_root / "centos").mkdir()
    _ok(qrm_cli("filesystem-image", "add", "-n", "centos", "-s", "NFS", "-l", str(export_root / "centos")))
    for location in ('/x"; Path = "/', str(export_root / ".." / "etc"), "/etc"):
        _one_line_error(qrm_cli("filesystem-image", "add", "-n", "evil", "-s", "NFS", "-l", location))
    assert sorted(p.name for p in export_root.iterdir() if not p.name.startswith(".")) == ["centos", "web"]

    status = qrm_cli("nfs", "status", "--json")
    _ok(status)
    assert status.json()["export_root"] == str(export_root)

    _ok(qrm_cli("filesystem-image", "remove", "web", "--purge"))
    assert not (export_root / "web").exists()


def test_storage_add_rejects_what_cannot_boot(qrm_cli, export_root: Path) -> None:
    _ok(qrm_cli("init"))
    assert "IPv4" in _one_line_error(qrm_cli("storage", "add", "-n", "N6", "-t", "nfs", "-i", "2001:db8::35"))
    _one_line_error(qrm_cli("storage", "add", "-n", "NL", "-t", "nfs", "-i", "127.0.0.1"))
    assert qrm_cli("storage", "list", "-o", "json").json() == []


def test_unconfigured_host_says_what_to_set(qrm_cli, qrm_settings: Settings) -> None:
    _ok(qrm_cli("init"))
    _ok(qrm_cli("storage", "add", "-n", "NFS", "-t", "NFS", "-i", "10.0.11.35", "-c", "QRMSRC"))
    _ok(qrm_cli("filesystem-image", "add", "-n", "centos", "-s", "NFS", "-l", "/exports/centos"))
    assert "QRM_NFS_EXPORT_ROOT" in _one_line_error(
        qrm_cli("filesystem-image", "add", "-n", "web", "-s", "NFS", "--size", "64")
    )
    assert [i["name"] for i in qrm_cli("filesystem-image", "list", "-o", "json").json()] == ["centos"]


def test_service_is_contributed_only_when_asked(
    qrm_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = HookContext(settings=qrm_settings, actor="tester")
    assert plugin.qrm_collect_services(ctx=ctx) == []
    monkeypatch.setenv("QRM_NFS_RUN_GANESHA", "true")
    (service,) = plugin.qrm_collect_services(ctx=ctx)
    assert isinstance(service, GaneshaService) and service.name == "nfs-ganesha"
    assert service.pid_file == qrm_settings.state_dir / "nfs" / "ganesha.pid"
