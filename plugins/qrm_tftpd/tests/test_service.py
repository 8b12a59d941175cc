"""The plugin's hooks, the background service, settings, and the remote boot configuration source."""

from __future__ import annotations

import importlib.metadata
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import make_resolver
from tftp_client import TftpFailure, fetch_sync

import qrm_tftpd.plugin
from qrm_core.context import BackgroundService, HookContext
from qrm_core.errors import InvalidInput
from qrm_core.services import boot_images
from qrm_core.services.boot import BootConfig
from qrm_tftpd.service import ServiceError, TftpService
from qrm_tftpd.settings import TftpSettings, load_settings
from qrm_tftpd.sources import RemoteSource


def test_the_plugin_module_imports_cheaply() -> None:
    code = (
        "import sys, qrm_tftpd.plugin; "
        "print(sorted(m for m in ('tftpy', 'qrm_tftpd.server', 'qrm_tftpd.cli') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_entry_point() -> None:
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="qrm.plugins")}
    assert points["tftpd"] == "qrm_tftpd.plugin"


def test_server_starts_and_stops_the_service(qrm_settings, qrm_plugins, qrm_ctx, monkeypatch) -> None:
    monkeypatch.setenv("QRM_TFTPD_LISTEN_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("QRM_TFTPD_PORT", "0")
    qrm_plugins.register(qrm_tftpd.plugin, "tftpd")
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")
    qrm_ctx.commit()  # SQLite: core opens transactions with BEGIN IMMEDIATE; end ours
    services = qrm_plugins.hooks.collect_services(HookContext(settings=qrm_settings, actor="server"))
    assert [s.name for s in services] == ["tftpd"]
    service = services[0]
    assert isinstance(service, BackgroundService)
    service.start()
    try:
        host, port = service.address
        assert (qrm_settings.data_dir / "tftpboot").is_dir()
        assert fetch_sync(host, port, "boot.ipxe").data.startswith(b"#!ipxe")
        assert b"qrm.mode=idle" in fetch_sync(host, port, "ipxe/52-54-00-00-00-01.ipxe").data
    finally:
        service.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))  # released
    service.stop()  # twice is harmless

    monkeypatch.setenv("QRM_TFTPD_ENABLED", "false")
    assert qrm_plugins.hooks.collect_services(HookContext(settings=qrm_settings, actor="server")) == []


def test_a_fresh_install_serves_tftp_on_loopback_only(
    qrm_settings, qrm_plugins, qrm_ctx, monkeypatch, caplog
) -> None:
    """Issue 15: a fresh install (default admin password, no address named) used
    to serve boot scripts holding the enrollment token on UDP 0.0.0.0:69."""
    from qrm_core.services import users

    users.ensure_admin(qrm_ctx, None)
    qrm_ctx.commit()
    monkeypatch.setenv("QRM_TFTPD_PORT", "0")
    qrm_plugins.register(qrm_tftpd.plugin, "tftpd")
    (service,) = qrm_plugins.hooks.collect_services(HookContext(settings=qrm_settings, actor="server"))
    with caplog.at_level("WARNING"):
        service.start()
    try:
        assert service.address[0] == "127.0.0.1"
        assert "tftpd: serving on 127.0.0.1 only" in caplog.text
    finally:
        service.stop()
    # Named, but the default password still there: refused in one line, nothing bound.
    for named in ({"QRM_TFTPD_LISTEN_ADDRESS": "0.0.0.0"}, {"QRM_PROVISIONING_ADDRESS": "10.9.8.7"}):
        for key, value in named.items():
            monkeypatch.setenv(key, value)
        settings = qrm_settings.model_copy(
            update={"provisioning_address": named.get("QRM_PROVISIONING_ADDRESS")}
        )
        refused = TftpService(settings, load_settings(), plugins=qrm_plugins)
        with pytest.raises(InvalidInput) as error:
            refused.start()
        where = next(iter(named.values()))
        assert error.value.message.startswith(f"refusing to listen on {where} (tftpd): the admin user 'qrm'")
        assert refused.server is None
        for key in named:
            monkeypatch.delenv(key)


def test_a_taken_port_is_a_one_line_error(qrm_settings, qrm_ctx) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        service = TftpService(qrm_settings, TftpSettings(listen_address="127.0.0.1", port=port))
        with pytest.raises(ServiceError, match=rf"cannot listen on UDP 127.0.0.1:{port}: the port is in use"):
            service.start()


def test_settings_from_environment_and_qrm_toml(tmp_path: Path, monkeypatch) -> None:
    for key in ("QRM_CONFIG", "QRM_TFTPD_PORT", "QRM_TFTPD_SOURCE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("QRM_DATA_DIR", str(tmp_path))
    (tmp_path / "qrm.toml").write_text('[tftpd]\nport = 1069\nsource = "remote"\nretry_seconds = 3\n')
    monkeypatch.setenv("QRM_TFTPD_PORT", "2069")
    settings = load_settings()
    assert (settings.port, settings.source, settings.retry_seconds) == (2069, "remote", 3)
    assert load_settings(port=6969).port == 6969
    monkeypatch.setenv("QRM_TFTPD_PORT", "sixty-nine")
    with pytest.raises(InvalidInput, match="invalid setting QRM_TFTPD_PORT"):
        load_settings()
    monkeypatch.delenv("QRM_TFTPD_PORT")
    with pytest.raises(InvalidInput, match=r"QRM_TFTPD_SERVER_URL.*not a plain http"):
        load_settings(server_url="http://x/ ; chain http://evil")
    with pytest.raises(InvalidInput, match="QRM_TFTPD_LISTEN_ADDRESS"):
        load_settings(listen_address="::1")


# -- remote: a stand-in for the qrm server's /agent/v1/boot/{mac} --------------
# The real endpoint lives in qrm_core's server; this plugin's tests must run with
# core alone, so a small HTTP server plays its documented part
# (docs/agent-protocol.md): bearer token, BootConfig JSON, /boot/<image>/<file>.

TOKEN = "enroll-me"


class StandIn(BaseHTTPRequestHandler):
    configs: dict[str, dict] = {}
    files: dict[str, bytes] = {}
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401)
            return
        if self.path.startswith("/agent/v1/boot/"):
            mac = self.path.rsplit("/", 1)[1].replace("%3A", ":")
            body = json.dumps(
                self.configs.get(mac) or {"mac": mac, "mode": "none", "message": "unknown"}
            ).encode()
        elif self.path in self.files:
            body = self.files[self.path]
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_remote_source(stand_in: str, serve, tmp_path: Path) -> None:
    mac = "52:54:00:00:00:42"
    StandIn.configs[mac] = BootConfig(
        mac=mac,
        mode="idle",
        boot_image="idle",
        kernel_name="boot/idle/vmlinuz",
        initrd_name="boot/idle/initrd",
        kernel_url=f"{stand_in}/boot/idle/vmlinuz",
        initrd_url=f"{stand_in}/boot/idle/initrd",
        cmdline=f"qrm.server={stand_in} qrm.mac={mac} qrm.mode=idle",
    ).model_dump()
    StandIn.files["/boot/idle/vmlinuz"] = b"K" * 100_000
    StandIn.hits.clear()
    source = RemoteSource(stand_in, TOKEN, timeout=5)
    server = serve(make_resolver(tmp_path, source))
    script = fetch_sync("127.0.0.1", server.port, "ipxe/52-54-00-00-00-42.ipxe").data.decode()
    assert f"kernel {stand_in}/boot/idle/vmlinuz initrd=initrd qrm.server={stand_in}" in script
    assert (
        "nothing to boot" in fetch_sync("127.0.0.1", server.port, "ipxe/52-54-00-00-00-43.ipxe").data.decode()
    )
    # kernel over TFTP, fetched from the server once for several machines
    for _ in range(3):
        assert fetch_sync("127.0.0.1", server.port, "boot/idle/vmlinuz").data == b"K" * 100_000
    assert StandIn.hits.count("/boot/idle/vmlinuz") == 1
    with pytest.raises(TftpFailure) as failure:
        fetch_sync("127.0.0.1", server.port, "boot/idle/initrd")  # the server has none
    assert failure.value.code == 1
    source.close()

    # a wrong token or an unreachable server: the machine is told, and asks again
    server = serve(make_resolver(tmp_path, RemoteSource(stand_in, "wrong", timeout=5)))
    script = fetch_sync("127.0.0.1", server.port, "ipxe/52-54-00-00-00-42.ipxe").data.decode()
    assert "boot configuration failed" in script and "HTTP 401" in script
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}"
    server = serve(make_resolver(tmp_path, RemoteSource(dead, TOKEN, timeout=2)))
    script = fetch_sync("127.0.0.1", server.port, "ipxe/52-54-00-00-00-42.ipxe").data.decode()
    assert "cannot reach the qrm server" in script
    with pytest.raises(TftpFailure) as failure:
        fetch_sync("127.0.0.1", server.port, "boot/idle/vmlinuz")
    assert (failure.value.code, failure.value.message) == (0, "boot file not available (qrm server)")
