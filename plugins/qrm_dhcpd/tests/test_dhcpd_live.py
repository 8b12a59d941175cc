"""The real servers (Kea 2.2, ISC dhcpd 4.4) in a network namespace, asked by busybox udhcpc.

Each test starts the server the way ``qrm server`` does (the plugin's
:class:`~qrm_dhcpd.service.ManagedDhcpServer`: full rewrite, ``-t`` check,
start inside ``QRM_DHCPD_NETNS``) and stops it by its PID. Resources are
added and removed through core's services with the plugin registered, so the
reservations travel the real hook path: Kea's control socket (``config-set``)
and ISC dhcpd's OMAPI, without restarting the server.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dhcpdlab import POOL, SERVER_IP, Wire, dhcpd_env, error_events, running
from sqlmodel import select

import qrm_dhcpd.plugin
from qrm_core.config import Settings
from qrm_core.errors import PluginError
from qrm_core.models import Resource
from qrm_core.plugins import PluginSystem
from qrm_core.services.resources import add_resource, remove_resource, show_resource
from qrm_dhcpd.kea import KeaControl
from qrm_dhcpd.service import ManagedDhcpServer
from qrm_dhcpd.settings import load_settings
from qrm_dhcpd.writer import ReservationWriter

pytestmark = pytest.mark.netns

MAC = "52:54:00:12:34:56"
OTHER_MAC = "52:54:00:12:34:57"
CLASH_MAC = "52:54:00:12:34:58"


def in_pool(ip: str | None) -> bool:
    assert ip is not None
    return (
        int(ipaddress.ip_address(POOL[0]))
        <= int(ipaddress.ip_address(ip))
        <= int(ipaddress.ip_address(POOL[1]))
    )


@pytest.fixture(params=["kea", "isc"])
def server(
    request: pytest.FixtureRequest,
    wire: Wire,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    qrm_settings: Settings,
) -> Iterator[ManagedDhcpServer]:
    request.getfixturevalue("kea_bin" if request.param == "kea" else "dhcpd_bin")
    # ISC's ping before each new pool offer costs a second per exchange; the restart test keeps it on
    with running(
        request.param, wire, short_dir, monkeypatch, qrm_settings, isc_ping_check="false"
    ) as managed:
        yield managed


def test_boot_file_by_client_type(server: ManagedDhcpServer, wire: Wire) -> None:
    plain = wire.dhcp(MAC, vendor=None)
    assert plain is not None and in_pool(plain.ip)
    assert plain.boot_file is None

    bios = wire.dhcp(MAC)
    assert bios is not None and in_pool(bios.ip)
    assert (bios.siaddr, bios.boot_file) == (SERVER_IP, "undionly.kpxe")
    assert bios.opt(175) is None

    for arch in (7, 9):
        efi = wire.dhcp(MAC, arch=arch)
        assert efi is not None and (efi.siaddr, efi.boot_file) == (SERVER_IP, "ipxe.efi"), arch

    ipxe = wire.dhcp(MAC, ipxe=True)
    assert ipxe is not None and (ipxe.siaddr, ipxe.boot_file) == (SERVER_IP, "boot.ipxe")
    # option 175 holding sub-option 176 (no-pxedhcp), length 1, value 1
    assert ipxe.opt(175) == "b00101"

    arm = wire.dhcp(MAC, arch=11)
    assert arm is not None and in_pool(arm.ip) and arm.boot_file is None

    options = wire.dhcp(MAC, vendor=None, request=("router", "dns", "domain"))
    assert options is not None
    assert options.env.get("router") == SERVER_IP
    assert options.env.get("dns", "").strip() == SERVER_IP
    assert options.env.get("domain") == "lab.example"


def test_reservation_follows_resource_hooks(
    server: ManagedDhcpServer, wire: Wire, qrm_ctx, qrm_plugins: PluginSystem
) -> None:  # type: ignore[no-untyped-def]
    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    pid = server.pid
    before = wire.dhcp(MAC)
    assert before is not None and in_pool(before.ip)

    add_resource(qrm_ctx, mac=MAC, ip="10.99.0.42", hostname="node42")
    add_resource(qrm_ctx, mac=OTHER_MAC, hostname="nameonly")
    reserved = wire.dhcp(MAC)
    assert reserved is not None
    assert (reserved.ip, reserved.hostname, reserved.boot_file) == ("10.99.0.42", "node42", "undionly.kpxe")
    name_only = wire.dhcp(OTHER_MAC)
    assert name_only is not None and in_pool(name_only.ip) and name_only.hostname == "nameonly"
    # a third resource claiming node42's address is reserved by name only
    add_resource(qrm_ctx, mac=CLASH_MAC, ip="10.99.0.42", hostname="clash")
    clash = wire.dhcp(CLASH_MAC)
    assert clash is not None and in_pool(clash.ip) and clash.hostname == "clash"
    assert wire.dhcp(MAC).ip == "10.99.0.42"  # type: ignore[union-attr]

    # an address/hostname change, announced as core announces it (qrm_resource_updated after commit)
    row = qrm_ctx.session.exec(select(Resource).where(Resource.mac == MAC)).one()
    row.ip, row.hostname = "10.99.0.52", "renamed"
    qrm_ctx.session.add(row)
    qrm_ctx.session.commit()
    qrm_plugins.hooks.resource_updated(show_resource(qrm_ctx, MAC), ["ip", "hostname"], qrm_ctx.hook_ctx)
    moved = wire.dhcp(MAC)
    assert moved is not None and (moved.ip, moved.hostname) == ("10.99.0.52", "renamed")

    remove_resource(qrm_ctx, MAC)
    after = wire.dhcp(MAC)
    assert after is not None and in_pool(after.ip) and after.hostname is None

    assert server.pid == pid and server.process is not None and server.process.poll() is None
    assert error_events(qrm_ctx) == []


def test_kea_sync_applies_a_new_boot_loader_live(
    wire: Wire,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    qrm_settings: Settings,
    qrm_cli,
    kea_bin: str,
) -> None:  # type: ignore[no-untyped-def]
    with running("kea", wire, short_dir, monkeypatch, qrm_settings) as managed:
        assert wire.dhcp(MAC, ipxe=True).boot_file == "boot.ipxe"  # type: ignore[union-attr]
        monkeypatch.setenv("QRM_DHCPD_BOOT_LOADER", "pxelinux")
        result = qrm_cli("dhcpd", "sync")
        assert result.exit_code == 0, result.stderr
        assert "config-set" in result.stdout
        for kwargs in ({"ipxe": True}, {"arch": 7}, {}):
            offer = wire.dhcp(MAC, **kwargs)  # type: ignore[arg-type]
            assert offer is not None and offer.boot_file == "pxelinux.0", kwargs
        ipxe = wire.dhcp(MAC, ipxe=True)
        assert ipxe is not None and ipxe.opt(175) == "b00101"
        assert managed.process is not None and managed.process.poll() is None


def test_kea_rejected_change_keeps_the_running_configuration(
    kea_server: ManagedDhcpServer, wire: Wire
) -> None:
    control = KeaControl(kea_server.backend.paths.control_socket)
    good = control.command("config-get")["arguments"]
    bad = {"Dhcp4": dict(good["Dhcp4"])}
    duplicate = [
        {"hw-address": MAC, "ip-address": "10.99.0.42"},
        {"hw-address": OTHER_MAC, "ip-address": "10.99.0.42"},
    ]
    bad["Dhcp4"]["subnet4"] = [dict(good["Dhcp4"]["subnet4"][0], reservations=duplicate)]

    with pytest.raises(PluginError, match=r"config-test.*already a reservation"):
        control.config_set(bad)
    offer = wire.dhcp(MAC)
    assert offer is not None and in_pool(offer.ip) and offer.boot_file == "undionly.kpxe"

    # Why config-test comes first: Kea 2.2 stops serving after a rejected config-set.
    answer = control.raw(b'{"command": "config-set", "arguments": ' + json.dumps(bad).encode() + b"}")
    assert answer["result"] == 1
    assert wire.dhcp(MAC, tries=2) is None


def test_isc_restart_serves_what_the_database_says(
    wire: Wire,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    qrm_settings: Settings,
    qrm_ctx,
    qrm_plugins,
    dhcpd_bin: str,
) -> None:  # type: ignore[no-untyped-def]
    """dhcpd replays host records from its leases file; a restart must not let old ones win."""
    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    dhcpd_env(monkeypatch, backend="isc", interface=wire.server_if, netns=wire.server_ns)
    managed = ManagedDhcpServer(load_settings(), qrm_settings)
    managed.start()
    try:
        add_resource(qrm_ctx, mac=MAC, ip="10.99.0.42", hostname="node42")
        add_resource(qrm_ctx, mac=OTHER_MAC, ip="10.99.0.43", hostname="node43")
        # what a client sends as its vendor class ends up quoted in the leases file
        hostile = wire.dhcp("52:54:00:aa:bb:cc", vendor='PXEClient x}";{host evil {')
        assert hostile is not None and in_pool(hostile.ip)
        remove_resource(qrm_ctx, MAC)  # OMAPI delete: "host qrm-... { deleted; }" in the leases file
    finally:
        managed.stop()
    # re-added while dhcpd is down: only the database and the next full rewrite know
    add_resource(qrm_ctx, mac=MAC, ip="10.99.0.44", hostname="node44")
    leases = managed.backend.paths.leases.read_text()
    assert "deleted;" in leases and "dynamic;" in leases and 'x}\\";{host evil {' in leases

    managed.start()
    try:
        offer = wire.dhcp(MAC)
        assert offer is not None and (offer.ip, offer.hostname) == ("10.99.0.44", "node44")
        other = wire.dhcp(OTHER_MAC)
        assert other is not None and (other.ip, other.hostname) == ("10.99.0.43", "node43")
        text = managed.backend.paths.leases.read_text()
        # host records are gone, the leases (and the quoted hostile string) are kept intact
        assert "deleted;" not in text and 'x}\\";{host evil {' in text
    finally:
        managed.stop()
    assert error_events(qrm_ctx) == []


def test_qrm_server_runs_the_dhcp_server(
    wire: Wire,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    qrm_settings: Settings,
    qrm_ctx,
    qrm_plugins: PluginSystem,
    kea_bin: str,
) -> None:  # type: ignore[no-untyped-def]
    """``qrm server`` collects the plugin's service, starts it, and stops it by PID."""
    from qrm_core.server import start_plugin_services

    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    dhcpd_env(
        monkeypatch,
        backend="kea",
        interface=wire.server_if,
        netns=wire.server_ns,
        socket_dir=short_dir,
        manage="true",
    )
    add_resource(qrm_ctx, mac=MAC, ip="10.99.0.42", hostname="node42")
    running = start_plugin_services(qrm_settings, qrm_plugins)
    try:
        service, writer = running.started
        assert isinstance(service, ManagedDhcpServer) and isinstance(writer, ReservationWriter)
        pid = service.pid
        offer = wire.dhcp(MAC)
        assert offer is not None and (offer.ip, offer.hostname) == ("10.99.0.42", "node42")
        # While the server runs, a hook queues its change and the writer applies it
        # (a config-set here: Kea without a hosts database).
        add_resource(qrm_ctx, mac=OTHER_MAC, ip="10.99.0.43", hostname="node43")
        assert writer.flush(30) and writer.applied == 1
        offer = wire.dhcp(OTHER_MAC)
        assert offer is not None and (offer.ip, offer.hostname) == ("10.99.0.43", "node43")
        # queued changes are applied before the server stops: the DHCP server stops last
        remove_resource(qrm_ctx, OTHER_MAC)
    finally:
        running.stop()
    assert writer.applied == 2
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert error_events(qrm_ctx) == []
