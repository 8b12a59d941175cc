"""With the real ``qrm server`` (core's QrmServer, in a thread): it starts and stops the TFTP
service, and a second TFTP server in ``remote`` mode renders the same files from its API."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from tftp_client import fetch_sync

import qrm_tftpd.plugin
from qrm_core.server import QrmServer
from qrm_core.services import boot_images, site
from qrm_tftpd.service import TftpService
from qrm_tftpd.settings import TftpSettings


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_runs_the_service_and_remote_mode_matches_local(
    qrm_settings, qrm_plugins, qrm_ctx, monkeypatch, tmp_path: Path
) -> None:
    http_port = free_tcp_port()
    url = f"http://127.0.0.1:{http_port}"
    monkeypatch.setenv("QRM_TFTPD_LISTEN_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("QRM_TFTPD_PORT", "0")
    settings = qrm_settings.model_copy(update={"server_url": url})
    qrm_plugins.register(qrm_tftpd.plugin, "tftpd")
    (tmp_path / "k").write_bytes(b"kernel!" * 5000)
    (tmp_path / "i").write_bytes(b"initrd!")
    boot_images.add_boot_image(
        qrm_ctx,
        name="idle",
        kernel_version="6.1",
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        cmdline="quiet",
    )
    token = site.get_enrollment_token(qrm_ctx)
    qrm_ctx.commit()  # SQLite: core opens transactions with BEGIN IMMEDIATE; end ours

    server = QrmServer(settings, qrm_plugins, "127.0.0.1", http_port)
    thread = server.start_in_thread()
    remote = None
    try:
        assert [s.name for s in server.services.started] == ["tftpd"]
        local_tftp = server.services.started[0]
        host, port = local_tftp.address  # type: ignore[attr-defined]
        names = ["ipxe/52-54-00-00-00-11.ipxe", "pxelinux.cfg/01-52-54-00-00-00-11"]
        local = {name: fetch_sync(host, port, name).data for name in names}
        assert (
            f"kernel {url}/boot/idle/vmlinuz initrd=initrd quiet qrm.server={url}".encode() in local[names[0]]
        )
        assert f"qrm.enroll={token}".encode() in local[names[0]]
        # what the script names over HTTP is there
        with urllib.request.urlopen(f"{url}/boot/idle/vmlinuz", timeout=10) as response:
            assert response.read() == (tmp_path / "k").read_bytes()

        # a TFTP server elsewhere, asking this server's API
        remote = TftpService(
            settings,
            TftpSettings(
                listen_address="127.0.0.1",
                port=0,
                source="remote",
                server_url=url,
                enrollment_token=token,
                root=tmp_path / "remote-root",
            ),
        )
        remote.start()
        rhost, rport = remote.address
        for name in names:
            assert fetch_sync(rhost, rport, name).data == local[name]
        assert fetch_sync(rhost, rport, "boot/idle/vmlinuz").data == (tmp_path / "k").read_bytes()
        assert fetch_sync(rhost, rport, "boot/idle/initrd").data == b"initrd!"
    finally:
        if remote is not None:
            remote.stop()
        server.stop()
        thread.join(15)
    assert not thread.is_alive()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))  # the server stopped the TFTP service
