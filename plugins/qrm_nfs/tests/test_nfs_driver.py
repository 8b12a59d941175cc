"""The driver's own rules: validation, root description, volumes, settings. No ganesha needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qrm_core.config import Settings
from qrm_core.drivers.base import ExportClient, StorageDriver, StorageTarget
from qrm_core.errors import DriverError, InvalidInput, NotFound
from qrm_nfs import ganesha
from qrm_nfs.driver import NfsStorage
from qrm_nfs.settings import NfsSettings, load_settings

STORAGE = StorageTarget(name="NFS", type="nfs", address="10.0.11.35", comment="QRMSRC")
INJECTIONS = [
    'web"; Path = "/',
    "web}",
    "web\nEXPORT {",
    "../etc",
    "a/b",
    ".hidden",
    "-rf",
    "web name",
    "%include",
    "w" * 65,
    "",
    "wéb",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("QRM_NFS_") or key == "QRM_CONFIG":
            monkeypatch.delenv(key)
    monkeypatch.setenv("QRM_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def core(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def managed(core: Settings, tmp_path: Path) -> NfsStorage:
    root = tmp_path / "exports"
    root.mkdir()
    return NfsStorage(core, NfsSettings(export_root=root, ganesha_config=tmp_path / "exports.conf"))


def test_is_a_storage_driver(core: Settings) -> None:
    driver = NfsStorage(core)
    assert isinstance(driver, StorageDriver) and driver.name == "nfs"


def test_validate_server(core: Settings) -> None:
    driver = NfsStorage(core)
    driver.validate_server(STORAGE)
    for address in ("2001:db8::35", "127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "nfs.example"):
        with pytest.raises(InvalidInput):
            driver.validate_server(StorageTarget(name="NFS", type="nfs", address=address))


def test_describe_root_is_what_initramfs_and_the_kernel_read(core: Settings) -> None:
    root = NfsStorage(core).describe_root(STORAGE, "/srv/qrm/nfs/web")
    assert root.kernel_args == (
        "root=/dev/nfs",
        "nfsroot=10.0.11.35:/srv/qrm/nfs/web,vers=3,tcp",
        "ip=dhcp",
        "rw",
    )
    assert all(token and not any(c.isspace() for c in token) for token in root.kernel_args)
    assert root.description == "nfs 10.0.11.35:/srv/qrm/nfs/web"
    with pytest.raises(InvalidInput):
        NfsStorage(core).describe_root(STORAGE, "/srv/x ip=none")


def test_unconfigured_pure_operations_work_and_managing_ones_say_what_to_set(core: Settings) -> None:
    driver = NfsStorage(core)
    driver.validate_location(STORAGE, "/exports/centos")
    for bad in ("exports/centos", "/", "/a//b", "/a/../b", "/a/./b", '/a"b', "/a b", "/a/", "/a;b", "/ä"):
        with pytest.raises(InvalidInput):
            driver.validate_location(STORAGE, bad)
    calls = [
        lambda: driver.create_volume(STORAGE, "web", 10),
        lambda: driver.remove_volume(STORAGE, "/exports/web"),
        lambda: driver.list_volumes(STORAGE),
        lambda: driver.export_volume(
            STORAGE, "/exports/web", ExportClient(mac="52:54:00:00:00:01", ip="10.0.0.5")
        ),
        lambda: driver.unexport_volume(
            STORAGE, "/exports/web", ExportClient(mac="52:54:00:00:00:01", ip="10.0.0.5")
        ),
    ]
    for call in calls:
        with pytest.raises(DriverError, match="QRM_NFS_EXPORT_ROOT") as info:
            call()
        assert "\n" not in info.value.message


def test_volumes_are_directories(managed: NfsStorage, tmp_path: Path) -> None:
    root = tmp_path / "exports"
    volume = managed.create_volume(STORAGE, "web", 100)
    assert volume.location == str(root / "web") and (root / "web").is_dir() and volume.size_mb == 100
    with pytest.raises(DriverError, match="already exists"):
        managed.create_volume(STORAGE, "web", 100)
    managed.create_volume(STORAGE, "db.v2", 1)
    (root / "stray-file").write_text("not a volume")
    (root / "link").symlink_to(root / "web")
    listed = managed.list_volumes(STORAGE)
    assert [(v.location, v.size_mb, v.exported_to) for v in listed] == [
        (str(root / "db.v2"), 1, ()),
        (str(root / "web"), 100, ()),
    ]
    # Importing: existing directories only, directly under the export root.
    managed.validate_location(STORAGE, str(root / "web"))
    for bad in (
        str(root / "missing"),
        str(root / "link"),
        str(root / "stray-file"),
        "/exports/web",
        str(root),
    ):
        with pytest.raises(InvalidInput):
            managed.validate_location(STORAGE, bad)
    (root / "web" / "etc").mkdir()
    (root / "web" / "etc" / "hostname").write_text("web\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the volume's\n")
    (root / "web" / "escape").symlink_to(outside)  # a root filesystem is full of links
    managed.remove_volume(STORAGE, str(root / "web"))
    assert not (root / "web").exists() and (root / "link").is_symlink()
    assert (outside / "keep.txt").exists()  # links are removed, never followed
    with pytest.raises(NotFound):
        managed.remove_volume(STORAGE, str(root / "web"))
    with pytest.raises(NotFound):
        managed.remove_volume(STORAGE, str(root / "link"))


@pytest.mark.parametrize("name", INJECTIONS)
def test_bad_volume_names_change_nothing(managed: NfsStorage, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInput):
        managed.create_volume(STORAGE, name, 10)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == []
    assert not (tmp_path / "etc").exists()


def test_size_is_checked_against_free_space(managed: NfsStorage, tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="MB free"):
        managed.create_volume(STORAGE, "huge", 1024 * 1024 * 1024)
    with pytest.raises(InvalidInput):
        managed.create_volume(STORAGE, "zero", 0)
    assert not (tmp_path / "exports" / "huge").exists()


def test_unexport_of_unknown_client_is_a_no_op(managed: NfsStorage, tmp_path: Path) -> None:
    volume = managed.create_volume(STORAGE, "idle", 1)
    managed.unexport_volume(STORAGE, volume.location, ExportClient(mac="52:54:00:00:00:01", ip="10.0.0.5"))
    managed.unexport_volume(STORAGE, volume.location, ExportClient(mac="52:54:00:00:00:01", ip=None))
    assert not (tmp_path / "exports.conf").exists()


def test_settings_from_env_and_qrm_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "qrm.toml"
    config.write_text('[nfs]\nexport_root = "/srv/from-toml"\nganesha_config = "/etc/ganesha/qrm.conf"\n')
    monkeypatch.setenv("QRM_CONFIG", str(config))
    monkeypatch.setenv("QRM_NFS_EXPORT_ROOT", "/srv/from-env")
    nfs = load_settings()
    assert nfs.export_root == Path("/srv/from-env")  # the environment wins
    assert nfs.ganesha_config == Path("/etc/ganesha/qrm.conf")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("EXPORT_ROOT", "srv/relative"),
        ("EXPORT_ROOT", '/srv/x"; %include "/etc/passwd'),
        ("GANESHA_CONFIG", "/etc/ganesha/../passwd"),
        ("NETNS", "a b"),
        ("FIRST_EXPORT_ID", "0"),
    ],
)
def test_bad_settings_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, core: Settings, key: str, value: str
) -> None:
    monkeypatch.setenv(f"QRM_NFS_{key}", value)
    with pytest.raises(DriverError, match=f"QRM_NFS_{key}") as info:
        NfsStorage(core).create_volume(STORAGE, "web", 1)
    assert "\n" not in info.value.message


def test_detect_missing_dependencies(core: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    missing = NfsStorage(core).detect_missing_dependencies()
    assert [m.split()[0] for m in missing] == ["ganesha.nfsd", "rpcbind"]


def test_a_stale_pid_file_is_never_signalled(tmp_path: Path) -> None:
    pid_file = tmp_path / "ganesha.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # a live process, but not ganesha.nfsd
    assert ganesha.running_pid(pid_file) is None
    pid_file.write_text("not a number\n")
    assert ganesha.running_pid(pid_file) is None
    assert ganesha.running_pid(tmp_path / "absent.pid") is None


def test_export_root_must_be_its_real_path(core: Settings, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    driver = NfsStorage(core, NfsSettings(export_root=tmp_path / "alias"))
    with pytest.raises(DriverError, match="real path"):
        driver.create_volume(STORAGE, "web", 1)
    assert list((tmp_path / "real").iterdir()) == []


def test_a_damaged_record_is_a_clear_error(managed: NfsStorage, tmp_path: Path) -> None:
    volume = managed.create_volume(STORAGE, "web", 1)
    (tmp_path / "exports" / ".qrm-nfs.json").write_text(
        json.dumps({"volumes": {volume.location: {"export_id": "x", "clients": ["10.0.0.5"]}}})
    )
    with pytest.raises(DriverError, match="damaged"):
        managed.sync()
    (tmp_path / "exports" / ".qrm-nfs.json").write_text("{not json")
    with pytest.raises(DriverError, match="cannot read"):
        managed.list_volumes(STORAGE)
