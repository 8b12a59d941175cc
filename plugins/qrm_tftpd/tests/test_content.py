"""Name handling and the lookup order, on the real file system."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import IPXE_DIR, PXELINUX_DIR, SYSLINUX_DIR, make_resolver, need_file

from qrm_core.services.boot import BootConfig
from qrm_tftpd.content import ContentResolver, FileCache, normalise_name, open_regular
from qrm_tftpd.server import Content, TftpError


def test_normalise_name() -> None:
    assert normalise_name("/pxelinux.0") == "pxelinux.0"
    assert normalise_name("//boot//idle/vmlinuz") == "boot/idle/vmlinuz"
    for bad in ["", "..", "a/../b", "./a", ".hidden", "a/.b", "a\\b", "a b", "é", "a\x00b", "x" * 256, "/"]:
        with pytest.raises(TftpError):
            normalise_name(bad)


def test_open_regular_checks_what_was_opened(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").write_text("x")
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(TftpError, match="outside the boot root"):
        open_regular(root / "link", inside=str(root))
    fd, st = open_regular(root / "link")  # trusted paths (package files) may be symlinks
    os.close(fd)
    assert st.st_size == 1
    with pytest.raises(TftpError, match="not a regular file"):
        open_regular(root, inside=str(tmp_path))
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(TftpError):
        open_regular(root / "loop", inside=str(root))


def test_cache_notices_a_replaced_file(tmp_path: Path) -> None:
    cache = FileCache(1 << 20)
    path = tmp_path / "f"
    path.write_bytes(b"one")
    fd, st = open_regular(path)
    assert cache.content(fd, st, "x").data == b"one"
    path.write_bytes(b"second")
    fd, st = open_regular(path)
    assert cache.content(fd, st, "x").data == b"second"
    big = tmp_path / "big"
    big.write_bytes(b"x" * (5 << 20))
    fd, st = open_regular(big)
    content = cache.content(fd, st, "x")
    assert content.fd is not None and content.data is None  # large files stay on disk
    content.close()


class Source:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def boot_config(self, mac: str) -> BootConfig:
        self.asked.append(mac)
        return BootConfig(mac=mac, mode="none", message="nothing")

    def boot_file(self, image: str, which: str) -> Content | None:
        return Content.of_bytes(f"{image}/{which}".encode(), "test") if image == "known" else None

    def describe(self) -> str:
        return "test"

    def check(self) -> None:
        pass


def test_lookup_order(tmp_path: Path) -> None:
    need_file(IPXE_DIR / "ipxe.efi", "ipxe")
    root = tmp_path / "root"
    (root / "ipxe").mkdir(parents=True)
    (root / "pxelinux.cfg").mkdir()
    (root / "boot" / "other").mkdir(parents=True)
    # files in the root never shadow generated names
    (root / "boot.ipxe").write_text("stale")
    (root / "ipxe" / "52-54-00-12-34-56.ipxe").write_text("stale")
    (root / "pxelinux.cfg" / "01-52-54-00-12-34-56").write_text("stale")
    (root / "pxelinux.cfg" / "default").write_text("operator default")
    (root / "boot" / "other" / "vmlinuz").write_text("static kernel")
    source = Source()
    resolver = make_resolver(root, source)
    assert resolver.resolve("boot.ipxe").data.startswith(b"#!ipxe")
    assert b"nothing to boot" in resolver.resolve("ipxe/52-54-00-12-34-56.ipxe").data
    assert b"nothing to boot" in resolver.resolve("pxelinux.cfg/01-52-54-00-12-34-56").data
    assert b"nothing to boot" in resolver.resolve("ipxe/52-54-00-AA-BB-CC.ipxe").data
    assert source.asked == ["52:54:00:12:34:56", "52:54:00:12:34:56", "52:54:00:aa:bb:cc"]
    assert resolver.resolve("pxelinux.cfg/default").data == b"operator default"
    assert resolver.resolve("boot/known/initrd").data == b"known/initrd"
    assert resolver.resolve("boot/other/vmlinuz").data == b"static kernel"  # unknown image: static root
    assert resolver.resolve("ipxe.efi").data == (IPXE_DIR / "ipxe.efi").read_bytes()
    with pytest.raises(TftpError) as failure:
        resolver.resolve("pxelinux.cfg/C0A80001")
    assert failure.value.code == 1


def test_loader_report_names_the_missing_package(tmp_path: Path) -> None:
    resolver = ContentResolver(
        Source(),
        root=tmp_path,
        ipxe_dir=tmp_path / "no-ipxe",
        pxelinux_dir=PXELINUX_DIR,
        syslinux_modules_dir=SYSLINUX_DIR,
    )
    report = {name: problem for name, _where, problem in resolver.loader_report()}
    assert report["undionly.kpxe"] == "missing: install the Debian package ipxe"
    assert report["ipxe.efi"] == "missing: install the Debian package ipxe"
    (tmp_path / "ipxe.efi").write_bytes(b"own build")
    report = {name: problem for name, _where, problem in resolver.loader_report()}
    assert report["ipxe.efi"] is None
