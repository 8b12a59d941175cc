"""The example-dir storage driver against real directories, loaded by name through stevedore."""

from __future__ import annotations

import json

import pytest

from qrm_core.drivers.base import ExportClient, StorageDriver, StorageTarget
from qrm_core.errors import DriverError, InvalidInput, NotFound
from qrm_core.plugins import PluginSystem

SERVER = StorageTarget(name="local", type="example-dir", address="10.0.0.1")
CLIENT = ExportClient(mac="52:54:00:00:30:01", ip="10.0.0.7")


@pytest.fixture
def driver(plain_settings) -> StorageDriver:
    loaded = PluginSystem(plain_settings, discover_plugins=False).load().storage_driver("example-dir")
    assert isinstance(loaded, StorageDriver) and loaded.name == "example-dir"
    return loaded


def test_volume_life_cycle(driver, plain_settings) -> None:
    root = plain_settings.data_dir / "example-dir"
    assert driver.detect_missing_dependencies() == []
    info = driver.create_volume(SERVER, "web", 100)
    assert (info.location, info.size_mb) == ("web", 100)
    assert (root / "local" / "web").is_dir()
    (root / "local" / "web" / "etc").mkdir()  # data in the volume

    driver.export_volume(SERVER, "web", CLIENT)
    driver.export_volume(SERVER, "web", CLIENT)  # idempotent
    assert [(v.location, v.exported_to) for v in driver.list_volumes(SERVER)] == [("web", ("10.0.0.7",))]
    with pytest.raises(DriverError, match=r"still exported to 10\.0\.0\.7"):
        driver.remove_volume(SERVER, "web")

    root_spec = driver.describe_root(SERVER, "web")
    assert root_spec.kernel_args == (f"qrm.root=dir:10.0.0.1:{root}/local/web",)

    driver.unexport_volume(SERVER, "web", CLIENT)
    driver.unexport_volume(SERVER, "web", CLIENT)  # idempotent
    driver.remove_volume(SERVER, "web")
    assert not (root / "local" / "web").exists()
    assert json.loads((root / "local" / ".volumes.json").read_text()) == {"volumes": {}}
    with pytest.raises(NotFound):
        driver.remove_volume(SERVER, "web")


def test_imported_directories_are_adopted(driver, plain_settings) -> None:
    existing = plain_settings.data_dir / "example-dir" / "local" / "made-by-hand"
    existing.mkdir(parents=True)
    driver.validate_location(SERVER, "made-by-hand")
    driver.export_volume(SERVER, "made-by-hand", CLIENT)
    assert driver.list_volumes(SERVER)[0].exported_to == ("10.0.0.7",)


@pytest.mark.parametrize(
    "location", ["", "../etc", "a/b", "/abs", ".hidden", "with space", "x" * 65, "semi;colon", "new\nline"]
)
def test_bad_locations_are_refused_before_anything_happens(driver, plain_settings, location) -> None:
    with pytest.raises(InvalidInput) as info:
        driver.validate_location(SERVER, location)
    assert "\n" not in info.value.message
    with pytest.raises(InvalidInput):
        driver.create_volume(SERVER, location, 10)
    assert not (plain_settings.data_dir / "example-dir").exists()


def test_other_refusals(driver, plain_settings, monkeypatch) -> None:
    with pytest.raises(InvalidInput, match="size must be positive"):
        driver.create_volume(SERVER, "web", 0)
    driver.create_volume(SERVER, "web", 1)
    with pytest.raises(DriverError, match="already exists"):
        driver.create_volume(SERVER, "web", 1)
    with pytest.raises(InvalidInput, match="no IP address"):
        driver.export_volume(SERVER, "web", ExportClient(mac=CLIENT.mac, ip=None))
    with pytest.raises(NotFound):
        driver.export_volume(SERVER, "nothere", CLIENT)
    monkeypatch.setenv("QRM_EXAMPLE_STORAGE_ROOT", "/tmp/has space")
    with pytest.raises(InvalidInput, match="QRM_EXAMPLE_STORAGE_ROOT"):
        driver.validate_server(SERVER)


def test_unwritable_root_is_reported(driver, monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("QRM_EXAMPLE_STORAGE_ROOT", str(blocker / "root"))
    assert driver.detect_missing_dependencies() == [
        f"a writable directory {blocker / 'root'} (QRM_EXAMPLE_STORAGE_ROOT)"
    ]
    with pytest.raises(DriverError, match="cannot use storage directory"):
        driver.create_volume(SERVER, "web", 1)


def test_through_the_cli(qrm_cli, qrm_settings) -> None:
    root = qrm_settings.data_dir / "example-dir"
    assert qrm_cli("init").exit_code == 0
    assert qrm_cli("storage", "add", "-n", "local", "-t", "example-dir", "-i", "10.0.0.1").exit_code == 0
    made = qrm_cli("filesystem-image", "add", "-n", "web", "-s", "local", "--size", "64")
    assert made.exit_code == 0, made.stderr
    assert (root / "local" / "web").is_dir()

    bad = qrm_cli("filesystem-image", "add", "-n", "evil", "-s", "local", "-l", "../../etc")
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1 and "must be a volume name" in bad.stderr
    assert [i["name"] for i in qrm_cli("filesystem-image", "list", "-o", "json").json()] == ["web"]

    assert qrm_cli("filesystem-image", "remove", "web", "--purge").exit_code == 0
    assert not (root / "local" / "web").exists()
