"""The ramdisk storage driver on real files, its HTTP route in a real FastAPI application,
and the driver through qrm's services (loaded by name through its entry point)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qrm_core.config import Settings
from qrm_core.drivers.base import ExportClient, StorageTarget
from qrm_core.errors import DriverError, InvalidInput, NotFound
from qrm_core.services import boot, boot_images, resources, storage
from qrm_core.services import virtual_environments as ves
from qrm_ramdisk import plugin
from qrm_ramdisk.driver import RamdiskStorage

RAM = StorageTarget(name="ram", type="ramdisk", address="10.0.0.1")
NODE = ExportClient(mac="52:54:00:00:00:05", ip="10.0.0.5")
OTHER = ExportClient(mac="52:54:00:00:00:06", ip="10.0.0.6")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("QRM_RAMDISK_"):
            monkeypatch.delenv(key)


@pytest.fixture
def driver(tmp_path: Path) -> RamdiskStorage:
    return RamdiskStorage(Settings(data_dir=tmp_path / "data", server_url="http://10.0.0.1:8080"))


def test_validation(driver: RamdiskStorage) -> None:
    driver.validate_server(RAM)
    with pytest.raises(InvalidInput, match="not an IP address"):
        driver.validate_server(StorageTarget(name="ram", type="ramdisk", address="server.example"))
    driver.validate_location(RAM, "web-1.0_x")
    for bad in ("", "../etc", "a/b", ".hidden", "x.tar.gz", "a b", "x" * 65, "web;reboot"):
        with pytest.raises(InvalidInput, match="invalid volume name"):
            driver.validate_location(RAM, bad)


def test_volume_life(driver: RamdiskStorage, tmp_path: Path) -> None:
    info = driver.create_volume(RAM, "scratch", 256)
    assert (info.location, info.size_mb) == ("scratch", 256)
    archive = tmp_path / "data" / "ramdisk" / "ram" / "scratch.tar.gz"
    assert archive.is_file()
    with pytest.raises(DriverError, match="already exists"):
        driver.create_volume(RAM, "scratch", 256)
    with pytest.raises(InvalidInput, match="positive"):
        driver.create_volume(RAM, "zero", 0)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hello\n")
    driver.import_volume(RAM, "web", tree)
    assert [(v.location, v.size_mb, v.exported_to) for v in driver.list_volumes(RAM)] == [
        ("scratch", 256, ()),
        ("web", 1, ()),
    ]

    driver.export_volume(RAM, "web", NODE)
    driver.export_volume(RAM, "web", NODE)  # idempotent
    driver.export_volume(RAM, "web", ExportClient(mac=OTHER.mac, ip="::ffff:10.0.0.6"))
    assert driver.list_volumes(RAM)[1].exported_to == ("10.0.0.5", "10.0.0.6")
    with pytest.raises(InvalidInput, match="has no IP address"):
        driver.export_volume(RAM, "web", ExportClient(mac=NODE.mac, ip=None))
    with pytest.raises(DriverError, match="has no archive"):
        driver.export_volume(RAM, "ghost", NODE)
    with pytest.raises(DriverError, match=re.escape("still exported to 10.0.0.5, 10.0.0.6")):
        driver.remove_volume(RAM, "web")
    driver.unexport_volume(RAM, "web", NODE)
    driver.unexport_volume(RAM, "web", NODE)  # idempotent
    driver.unexport_volume(RAM, "web", OTHER)
    driver.remove_volume(RAM, "web")
    assert not (tmp_path / "data" / "ramdisk" / "ram" / "web.tar.gz").exists()
    with pytest.raises(NotFound):
        driver.remove_volume(RAM, "web")
    record = json.loads((tmp_path / "data" / "ramdisk" / "ram" / "volumes.json").read_text())
    assert record == {"volumes": {"scratch": {"size_mb": 256, "exports": [], "origin": "skeleton"}}}


def test_describe_root(driver: RamdiskStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver.create_volume(RAM, "scratch", 300)
    root = driver.describe_root(RAM, "scratch")
    assert root.kernel_args == (
        "qrm.rootfs=http://10.0.0.1:8080/plugins/ramdisk/ram/scratch",
        "qrm.rootfs_size=300",
    )
    assert root.description == "ramdisk ram/scratch (300 MB in RAM)"
    monkeypatch.setenv("QRM_RAMDISK_BASE_URL", "http://192.168.5.1:8000/")
    other = RamdiskStorage(Settings(data_dir=tmp_path / "data"))
    assert other.describe_root(RAM, "x").kernel_args == (
        "qrm.rootfs=http://192.168.5.1:8000/plugins/ramdisk/ram/x",
    )
    monkeypatch.delenv("QRM_RAMDISK_BASE_URL")
    with pytest.raises(DriverError, match="set QRM_SERVER_URL"):
        RamdiskStorage(Settings(data_dir=tmp_path / "data")).describe_root(RAM, "x")
    monkeypatch.setenv("QRM_RAMDISK_BASE_URL", "ftp://nope")
    with pytest.raises(DriverError, match="QRM_RAMDISK_BASE_URL"):
        RamdiskStorage(Settings(data_dir=tmp_path / "data")).describe_root(RAM, "x")


def app_for(settings: Settings) -> FastAPI:
    app = FastAPI()
    app.state.settings = settings
    plugin.qrm_register_routers(app)
    return app


def test_the_route_serves_exported_clients_only(driver: RamdiskStorage, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hello\n")
    driver.import_volume(RAM, "web", tree)
    driver.export_volume(RAM, "web", NODE)
    app = app_for(driver.settings)
    archive = (tmp_path / "data" / "ramdisk" / "ram" / "web.tar.gz").read_bytes()

    node = TestClient(app, client=("10.0.0.5", 40000))
    answer = node.get("/plugins/ramdisk/ram/web")
    assert answer.status_code == 200 and answer.content == archive
    assert answer.headers["content-type"] == "application/gzip"
    head = node.head("/plugins/ramdisk/ram/web")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(archive)
    (tmp_path / "web.tar.gz").write_bytes(answer.content)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["/bin/busybox", "tar", "-xzf", str(tmp_path / "web.tar.gz"), "-C", str(out)], check=True)
    assert (out / "etc" / "motd").read_text() == "hello\n"

    mapped = TestClient(app, client=("::ffff:10.0.0.5", 40000))
    assert mapped.get("/plugins/ramdisk/ram/web").status_code == 200
    other = TestClient(app, client=("10.0.0.6", 40000))
    refused = other.get("/plugins/ramdisk/ram/web")
    assert refused.status_code == 403 and "not exported to 10.0.0.6" in refused.json()["detail"]
    assert node.get("/plugins/ramdisk/ram/missing").status_code == 404
    assert node.get("/plugins/ramdisk/other/web").status_code == 404
    assert node.get("/plugins/ramdisk/ram/..%2f..%2fvolumes.json").status_code == 404
    assert node.get("/plugins/ramdisk/ram/volumes.json").status_code == 404
    driver.unexport_volume(RAM, "web", NODE)
    assert node.get("/plugins/ramdisk/ram/web").status_code == 403


def test_through_qrm_services(qrm_ctx, qrm_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Core finds the driver by name ("-t RAMDISK"), creates volumes through it, exports
    to the assigned machine and puts its root arguments on the VE's kernel command line."""
    monkeypatch.setenv("QRM_RAMDISK_BASE_URL", "http://10.0.0.1:8080")
    storage.add_storage(qrm_ctx, name="ram", type="RAMDISK", address="10.0.0.1")
    image = storage.add_filesystem_image(qrm_ctx, name="scratch", storage="ram", size_mb=128)
    assert (image.location, image.origin, image.size_mb) == ("scratch", "empty", 128)
    with pytest.raises(InvalidInput, match="invalid volume name"):
        storage.add_filesystem_image(qrm_ctx, name="bad", storage="ram", location="../x")
    (tmp_path / "k").write_bytes(b"k" * 70000)
    (tmp_path / "i").write_bytes(b"i")
    boot_images.add_boot_image(
        qrm_ctx, name="idle", kernel_version="6.1", kernel=tmp_path / "k", initrd=tmp_path / "i"
    )
    web = ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="scratch")
    ves.start_ve(qrm_ctx, "web")  # a VE boot is only for a VE that should run
    res = resources.add_resource(qrm_ctx, mac=NODE.mac, ip=NODE.ip)
    row = resources.find_resource_row(qrm_ctx, res.id)
    resources.transition(qrm_ctx, row, "idle")
    row.ve_id = web.id
    resources.transition(qrm_ctx, row, "assigned")
    qrm_ctx.commit()
    storage.export_to(qrm_ctx, web.id, row)
    config = boot.boot_config(qrm_ctx, NODE.mac, server_url="http://10.0.0.1:8080")
    assert "qrm.rootfs=http://10.0.0.1:8080/plugins/ramdisk/ram/scratch qrm.rootfs_size=128" in config.cmdline
    assert config.root == "ramdisk ram/scratch (128 MB in RAM)"
    app = app_for(qrm_settings)
    assert TestClient(app, client=(NODE.ip, 1)).get("/plugins/ramdisk/ram/scratch").status_code == 200
    assert TestClient(app, client=(OTHER.ip, 1)).get("/plugins/ramdisk/ram/scratch").status_code == 403
    storage.unexport_from(qrm_ctx, web.id, row)
    assert TestClient(app, client=(NODE.ip, 1)).get("/plugins/ramdisk/ram/scratch").status_code == 403
