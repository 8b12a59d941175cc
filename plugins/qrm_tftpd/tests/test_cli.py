"""``qrm tftpd`` as operators run it: --check, render, and the foreground server (a real process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tftp_client import fetch_sync

from qrm_core.services import boot_images
from qrm_core.testkit import free_port


def test_check_reports_what_is_missing_and_what_a_mac_boots(qrm_cli, qrm_ctx, tmp_path: Path) -> None:
    args = ("tftpd", "--listen", "127.0.0.1", "--port", "0", "--check")
    result = qrm_cli(*args)
    assert result.exit_code == 1
    assert "boot images     none  PROBLEM: no boot image" in result.stdout
    assert "/usr/lib/ipxe/undionly.kpxe" in result.stdout

    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "i").write_bytes(b"i")
    boot_images.add_boot_image(
        qrm_ctx, name="idle", kernel_version="6.1", kernel=tmp_path / "k", initrd=tmp_path / "i"
    )
    boot_images.set_default_boot_image(qrm_ctx, "idle")
    qrm_ctx.commit()  # SQLite: core opens transactions with BEGIN IMMEDIATE; end ours
    result = qrm_cli(*args, "--mac", "52-54-00-12-34-56", "--server-url", "http://10.0.0.1:8080")
    assert result.exit_code == 0, result.stdout + result.stderr
    out = result.stdout
    assert "kernels         HTTP from http://10.0.0.1:8080, TFTP as fallback" in out
    assert "  mode          idle" in out
    assert "  kernel        http://10.0.0.1:8080/boot/idle/vmlinuz" in out
    assert "ipxe/52-54-00-12-34-56.ipxe, pxelinux.cfg/01-52-54-00-12-34-56" in out
    assert out.rstrip().endswith("ok")

    # a missing boot loader directory is named, with the package to install
    os.environ["QRM_TFTPD_IPXE_DIR"] = str(tmp_path / "nowhere")
    try:
        result = qrm_cli(*args)
    finally:
        del os.environ["QRM_TFTPD_IPXE_DIR"]
    assert result.exit_code == 1
    assert "PROBLEM: missing: install the Debian package ipxe" in result.stdout


def test_render(qrm_cli, qrm_ctx) -> None:
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")
    qrm_ctx.commit()
    result = qrm_cli("tftpd", "render", "52:54:00:12:34:56")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("### ipxe/52-54-00-12-34-56.ipxe\n#!ipxe\n")
    assert "### pxelinux.cfg/01-52-54-00-12-34-56\n" in result.stdout
    only = qrm_cli("tftpd", "render", "52:54:00:12:34:56", "--format", "pxelinux")
    assert only.stdout.startswith("# qrm pxelinux config for 52:54:00:12:34:56")

    bad = qrm_cli("tftpd", "render", "01:00:5e:00:00:01")
    assert bad.exit_code == 1 and bad.stderr.strip().startswith("error: invalid MAC address")
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = qrm_cli("tftpd", "render", "52:54:00:12:34:56", "--format", "html")
    assert bad.exit_code == 1 and "invalid --format 'html'" in bad.stderr
    bad = qrm_cli("tftpd", "--mac", "52:54:00:12:34:56")
    assert bad.exit_code == 2
    os.environ["QRM_TFTPD_SOURCE"] = "carrier-pigeon"
    try:
        bad = qrm_cli("tftpd", "render", "52:54:00:12:34:56")
    finally:
        del os.environ["QRM_TFTPD_SOURCE"]
    assert bad.exit_code == 1 and bad.stderr.startswith("error: invalid setting QRM_TFTPD_SOURCE")


def test_foreground_server_until_sigterm(qrm_settings, qrm_ctx) -> None:
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")
    qrm_ctx.commit()
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from qrm_core.cli.main import run; run()",
            "tftpd",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert f"serving {qrm_settings.data_dir / 'tftpboot'} on 127.0.0.1:{port}" in first, (
            first + process.stderr.read() if process.poll() is not None else first
        )
        assert b"qrm.mode=idle" in fetch_sync("127.0.0.1", port, "ipxe/52-54-00-00-00-01.ipxe").data
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert "stopped after 1 requests, 1 transfers, 0 errors" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
