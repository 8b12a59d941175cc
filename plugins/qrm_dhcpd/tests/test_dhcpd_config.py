"""Generated configurations, checked by the real tools; hostile values; settings; the CLI; hooks without a server.

No network namespace is needed here: ``dhcpd -t`` does not look at
interfaces, and ``kea-dhcp4 -t`` is run on a copy listening on ``"*"`` when the
configured interface does not exist where the check runs (that path is
exercised here; the namespace path is exercised by test_live.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dhcpdlab import dhcpd_env
from sqlmodel import select

import qrm_dhcpd.plugin
from qrm_core.config import Settings
from qrm_core.context import BackgroundService, HookContext
from qrm_core.errors import InvalidInput, PluginError
from qrm_core.models import Event, Resource
from qrm_core.plugins import PluginSystem
from qrm_core.services.resources import add_resource, remove_resource
from qrm_dhcpd import isc, kea
from qrm_dhcpd.backends import get_backend
from qrm_dhcpd.hosts import build_host_set
from qrm_dhcpd.settings import load_settings

BACKENDS = ["kea", "isc"]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    request.getfixturevalue("kea_bin" if request.param == "kea" else "dhcpd_bin")
    return str(request.param)


def events(ctx, level: str = "error") -> list[str]:  # type: ignore[no-untyped-def]
    ctx.session.expire_all()
    return [e.message for e in ctx.session.exec(select(Event).where(Event.level == level)).all()]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".new"))


# ---------------------------------------------------------------------------
# Rendering and checking
# ---------------------------------------------------------------------------


def test_full_rewrite_passes_the_real_check(
    backend_name: str, monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings, qrm_ctx
) -> None:  # type: ignore[no-untyped-def]
    dhcpd_env(monkeypatch, backend=backend_name)
    for i in range(20):
        add_resource(qrm_ctx, mac=f"52:54:00:00:01:{i:02x}", ip=f"10.99.0.{10 + i}", hostname=f"node{i}")
    add_resource(qrm_ctx, mac="52:54:00:00:02:01", hostname="noaddress")
    backend = get_backend(load_settings(), qrm_settings)
    report = backend.full_sync()
    assert report.hosts == 21 and report.problems == []
    assert "valid" in report.check
    text = backend.paths.config.read_text()
    assert leftovers(backend.paths.config.parent) == []
    if backend_name == "kea":
        assert "checked listening on '*'" in report.check
        config = json.loads(text)
        reservations = config["Dhcp4"]["subnet4"][0]["reservations"]
        assert {
            "hw-address": "52:54:00:00:01:00",
            "ip-address": "10.99.0.10",
            "hostname": "node0",
        } in reservations
        assert {"hw-address": "52:54:00:00:02:01", "hostname": "noaddress"} in reservations
        classes = {c["name"]: c.get("boot-file-name") for c in config["Dhcp4"]["client-classes"]}
        assert classes == {
            "qrm-ipxe": "boot.ipxe",
            "qrm-pxe-efi64": "ipxe.efi",
            "qrm-pxe-bios": "undionly.kpxe",
            "qrm-pxe-other": None,
        }
    else:
        assert (
            "host qrm-525400000100-node0 { hardware ethernet 52:54:00:00:01:00; fixed-address 10.99.0.10;"
            in text
        )
        assert 'filename "undionly.kpxe";' in text and 'filename "ipxe.efi";' in text
        assert "option ipxe.no-pxedhcp 1;" in text
        assert "ping-check true;" in text
    # the same content again changes nothing but is still checked
    again = backend.full_sync()
    assert again.changed is False


def test_hostile_rows_cannot_inject_configuration(
    backend_name: str, monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings, qrm_ctx
) -> None:  # type: ignore[no-untyped-def]
    """Rows that bypassed core's validation (an old database, a manual INSERT) are left out or trimmed."""
    dhcpd_env(monkeypatch, backend=backend_name)
    hostile = [
        Resource(mac='aa:bb"}{;\n:cc:dd', ip="10.99.0.5", hostname="evilmac"),
        Resource(mac="52:54:00:00:00:01", ip="10.99.0.6", hostname='x"; } host evil { filename "pwn"; }'),
        Resource(mac="52:54:00:00:00:02", ip='10.99.0.7; filename "pwn"', hostname="badip"),
        Resource(mac="52:54:00:00:00:03", ip="10.99.0.8", hostname="line\nbreak"),
        Resource(mac="52:54:00:00:00:04", ip="10.99.0.9", hostname="fine"),
    ]
    for row in hostile:
        qrm_ctx.session.add(row)
    qrm_ctx.session.commit()
    backend = get_backend(load_settings(), qrm_settings)
    report = backend.full_sync()
    text = backend.paths.config.read_text()
    for needle in ("evil", "pwn", "line", "break", "aa:bb"):
        assert needle not in text, needle
    assert "fine" in text and "badip" in text and "52:54:00:00:00:01" in text
    problems = " | ".join(str(p) for p in report.problems)
    assert "not a MAC address" in problems
    assert "is not a plain DNS label" in problems
    assert "is not an IP address" in problems
    assert report.hosts == 4


def test_reservation_rules(monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings) -> None:
    dhcpd_env(monkeypatch, backend="kea")
    settings = load_settings()
    rows = [
        (1, "52:54:00:00:00:01", "10.99.0.42", "a"),
        (2, "52:54:00:00:00:02", "10.99.0.42", "b"),  # same address: second loses it
        (3, "52:54:00:00:00:03", "192.168.1.5", "c"),  # outside the subnet
        (4, "52:54:00:00:00:04", "10.99.0.1", "d"),  # the router / TFTP server
        (5, "52:54:00:00:00:05", "10.99.0.120", "e"),  # inside the pool
        (6, "52:54:00:00:00:05", "10.99.0.121", "f"),  # the same MAC again
        (7, "52:54:00:00:00:07", "10.99.0.255", "g"),  # broadcast
    ]
    kea_set = build_host_set(settings, rows, pinned_in_pool=True)
    got = {h.mac: (str(h.ip) if h.ip else None, h.hostname) for h in kea_set.hosts}
    assert got == {
        "52:54:00:00:00:01": ("10.99.0.42", "a"),
        "52:54:00:00:00:02": (None, "b"),
        "52:54:00:00:00:03": (None, "c"),
        "52:54:00:00:00:04": (None, "d"),
        "52:54:00:00:00:05": ("10.99.0.120", "e"),
        "52:54:00:00:00:07": (None, "g"),
    }
    assert len(kea_set.problems) == 5
    isc_set = build_host_set(settings, rows, pinned_in_pool=False)
    assert {h.mac: h.ip for h in isc_set.hosts}["52:54:00:00:00:05"] is None
    assert any("inside the dynamic pool" in str(p) for p in isc_set.problems)


def test_a_rejected_configuration_changes_nothing(
    backend_name: str, monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings, qrm_ctx
) -> None:  # type: ignore[no-untyped-def]
    dhcpd_env(monkeypatch, backend=backend_name)
    add_resource(qrm_ctx, mac="52:54:00:00:00:01", ip="10.99.0.42", hostname="node42")
    backend = get_backend(load_settings(), qrm_settings)
    backend.full_sync()
    good = backend.paths.config.read_bytes()
    if backend_name == "kea":
        real = kea.render

        def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
            config = real(*args, **kwargs)
            config["Dhcp4"]["subnet4"][0]["pools"] = [{"pool": "10.99.0.200 - 10.99.0.100"}]
            return config

        monkeypatch.setattr(kea, "render", broken)
        expected = "kea-dhcp4 -t rejected"
    else:
        real_isc = isc.render
        monkeypatch.setattr(
            isc, "render", lambda *a, **k: real_isc(*a, **k) + "host broken { hardware ethernet 52:54;\n"
        )
        expected = "dhcpd -t rejected.*line"
    with pytest.raises(PluginError, match=expected) as info:
        backend.full_sync()
    assert "\n" not in info.value.message
    assert backend.paths.config.read_bytes() == good
    assert leftovers(backend.paths.config.parent) == []


# ---------------------------------------------------------------------------
# Hooks without a running server
# ---------------------------------------------------------------------------


def test_hooks_do_nothing_when_not_configured(
    qrm_settings: Settings, qrm_ctx, qrm_plugins: PluginSystem
) -> None:  # type: ignore[no-untyped-def]
    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    add_resource(qrm_ctx, mac="52:54:00:00:00:01", ip="10.99.0.42")
    remove_resource(qrm_ctx, "52:54:00:00:00:01")
    assert not (qrm_settings.data_dir / "dhcpd").exists()
    assert events(qrm_ctx) == []
    assert qrm_dhcpd.plugin.qrm_collect_services(HookContext(qrm_settings, "tester")) == []


def test_hooks_build_the_settings_once_until_they_change(
    monkeypatch: pytest.MonkeyPatch, qrm_ctx, qrm_plugins: PluginSystem
) -> None:  # type: ignore[no-untyped-def]
    """The hooks run on every registration; building the settings there was
    half of a registration's CPU (docs/benchmarks.md). They are built once,
    and again when the environment changes."""
    from qrm_dhcpd.settings import DhcpdSettings

    builds: list[int] = []
    original = DhcpdSettings.load.__func__  # type: ignore[attr-defined]

    def counted(cls, **kwargs):  # type: ignore[no-untyped-def]
        builds.append(1)
        return original(cls, **kwargs)

    monkeypatch.setattr(DhcpdSettings, "load", classmethod(counted))
    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    for i in range(1, 4):
        add_resource(qrm_ctx, mac=f"52:54:00:00:00:0{i}", ip=f"10.99.0.4{i}")
    assert len(builds) == 1
    monkeypatch.setenv("QRM_DHCPD_LEASE_TIME", "900")
    add_resource(qrm_ctx, mac="52:54:00:00:00:04", ip="10.99.0.44")
    assert len(builds) == 2 and load_settings().lease_time == 900


def test_hooks_rewrite_the_file_when_the_server_is_down(
    backend_name: str,
    monkeypatch: pytest.MonkeyPatch,
    qrm_settings: Settings,
    qrm_ctx,
    qrm_plugins: PluginSystem,
    short_dir: Path,
) -> None:  # type: ignore[no-untyped-def]
    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    dhcpd_env(monkeypatch, backend=backend_name, socket_dir=short_dir)
    add_resource(qrm_ctx, mac="52:54:00:00:00:01", ip="10.99.0.42", hostname="node42")
    path = get_backend(load_settings(), qrm_settings).paths.config
    assert "52:54:00:00:00:01" in path.read_text()
    remove_resource(qrm_ctx, "52:54:00:00:00:01")
    assert "52:54:00:00:00:01" not in path.read_text()
    assert events(qrm_ctx) == []


def test_hook_failures_are_recorded_not_raised(
    monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings, qrm_ctx, qrm_plugins: PluginSystem
) -> None:  # type: ignore[no-untyped-def]
    qrm_plugins.register(qrm_dhcpd.plugin, "dhcpd")
    dhcpd_env(monkeypatch, backend="kea", pool_start="10.99.1.5")  # outside the subnet
    added = add_resource(qrm_ctx, mac="52:54:00:00:00:01", ip="10.99.0.42")
    assert added.mac == "52:54:00:00:00:01"
    recorded = events(qrm_ctx)
    assert len(recorded) == 1 and "QRM_DHCPD_" in recorded[0] and "\n" not in recorded[0]

    dhcpd_env(
        monkeypatch, backend="kea", kea_hosts_database="postgresql://nobody@/no_such_db?host=/nonexistent"
    )
    add_resource(qrm_ctx, mac="52:54:00:00:00:02", ip="10.99.0.43")
    recorded = events(qrm_ctx)
    assert len(recorded) == 2 and "could not reserve" in recorded[1] and "Kea hosts database" in recorded[1]


def test_managed_service_is_offered_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings
) -> None:
    ctx = HookContext(qrm_settings, "tester")
    dhcpd_env(monkeypatch, backend="kea")
    # configured: the reservation writer (qrm_dhcpd.writer) only
    (writer,) = qrm_dhcpd.plugin.qrm_collect_services(ctx)
    assert isinstance(writer, BackgroundService) and writer.name == "dhcpd-reservations"
    monkeypatch.setenv("QRM_DHCPD_MANAGE", "true")
    # managed: the server first (started first, stopped last), then the writer
    service, writer = qrm_dhcpd.plugin.qrm_collect_services(ctx)
    assert isinstance(service, BackgroundService) and service.name == "dhcpd (kea)"
    assert writer.name == "dhcpd-reservations"


def test_the_managed_server_waits_for_a_changed_admin_password(
    monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings, qrm_ctx, tmp_path: Path
) -> None:
    """Issue 15: core's one listening rule; the DHCP server answers beyond loopback,
    so it is refused in one line, before anything is written or started."""
    from qrm_core.services import users
    from qrm_dhcpd.service import ManagedDhcpServer

    users.ensure_admin(qrm_ctx, None)
    qrm_ctx.commit()
    dhcpd_env(monkeypatch, backend="kea", manage="true", state_dir=str(tmp_path / "state"))
    managed = ManagedDhcpServer(load_settings(), qrm_settings)
    with pytest.raises(InvalidInput) as refused:
        managed.start()
    assert refused.value.message.startswith("refusing to listen on ") and "(dhcpd)" in refused.value.message
    assert "'qrm init --admin-password ...'" in refused.value.message and "\n" not in refused.value.message
    assert managed.process is None and not (tmp_path / "state").exists()


def test_the_hook_module_imports_cheaply() -> None:
    code = (
        "import sys, qrm_dhcpd.plugin\n"
        "heavy = [m for m in ('pypureomapi', 'qrm_dhcpd.backends', 'qrm_dhcpd.keadb', 'qrm_dhcpd.isc') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("INTERFACE", "eth0;rm", "not an interface name"),
        ("DOMAIN", 'lab"; evil', "not a domain name"),
        ("POOL_START", "10.99.1.5", "not a host address of subnet"),
        ("POOL_END", "10.99.0.50", "is after QRM_DHCPD_POOL_END"),
        ("ROUTER", "10.99.0.120", "inside the dynamic pool"),
        ("SUBNET", "10.99.0.0/31", "too small"),
        ("ISC_OMAPI_SECRET", 'abc"def', "base64"),
        ("ISC_OMAPI_KEY_NAME", "key; evil", "not allowed"),
        ("NETNS", "../etc", "not allowed"),
        ("CONFIG_PATH", '/tmp/x"y', "quotes"),
        ("BOOT_LOADER", "grub", "ipxe"),
        ("LEASE_TIME", "5", "greater than or equal"),
        ("DNS_SERVERS", "10.0.0.1,not-an-ip", "IPv4"),
    ],
)
def test_bad_settings_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings, key: str, value: str, message: str
) -> None:
    dhcpd_env(monkeypatch, backend="kea")
    monkeypatch.setenv(f"QRM_DHCPD_{key}", value)
    with pytest.raises(InvalidInput, match=message) as info:
        load_settings()
    assert "\n" not in info.value.message


def test_settings_from_the_qrm_toml_table(monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings) -> None:
    qrm_settings.data_dir.mkdir(parents=True, exist_ok=True)
    (qrm_settings.data_dir / "qrm.toml").write_text(
        '[dhcpd]\nbackend = "isc"\ninterface = "br-prov"\nsubnet = "10.98.0.0/24"\npool_start = "10.98.0.10"\n'
        'pool_end = "10.98.0.20"\nnext_server = "10.98.0.1"\ndns_servers = ["10.98.0.1"]\n'
    )
    settings = load_settings()
    assert (settings.backend, settings.interface, str(settings.subnet)) == ("isc", "br-prov", "10.98.0.0/24")
    monkeypatch.setenv("QRM_DHCPD_BACKEND", "kea")  # the environment wins over the file
    assert load_settings().backend == "kea"


def test_long_control_socket_path_is_refused(monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings) -> None:
    dhcpd_env(monkeypatch, backend="kea", kea_control_socket="/tmp/" + "x" * 120 + "/kea.sock")
    with pytest.raises(InvalidInput, match="longer than 107 bytes"):
        get_backend(load_settings(), qrm_settings)


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_cli(
    backend_name: str, monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings, qrm_ctx, qrm_cli
) -> None:  # type: ignore[no-untyped-def]
    result = qrm_cli("dhcpd", "sync")
    assert result.exit_code == 1 and result.stderr.startswith("error: the DHCP service is not configured")
    assert result.stderr.count("\n") == 1
    result = qrm_cli("dhcpd", "status", "-o", "json")
    assert result.exit_code == 0 and result.json()["configured"] is False

    dhcpd_env(monkeypatch, backend=backend_name)
    add_resource(qrm_ctx, mac="52:54:00:00:00:01", ip="10.99.0.42", hostname="node42")
    shown = qrm_cli("dhcpd", "show")
    assert shown.exit_code == 0 and "52:54:00:00:00:01" in shown.stdout and "node42" in shown.stdout

    dry = qrm_cli("dhcpd", "sync", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    path = get_backend(load_settings(), qrm_settings).paths.config
    assert not path.exists()

    synced = qrm_cli("dhcpd", "sync", "-o", "json")
    assert synced.exit_code == 0, synced.stderr
    report = synced.json()
    assert report["reservations"] == 1 and report["backend"] == backend_name
    assert set(report["timings"]) >= {"read", "render", "check", "swap", "total"}
    assert path.exists() and "node42" in path.read_text()

    status = qrm_cli("dhcpd", "status", "-o", "json")
    assert status.exit_code == 0 and status.json()["running"] is False

    monkeypatch.setenv("QRM_DHCPD_POOL_START", "bogus")
    bad = qrm_cli("dhcpd", "sync")
    assert bad.exit_code == 1 and "QRM_DHCPD_POOL_START" in bad.stderr and bad.stderr.count("\n") == 1


def test_files_keep_secrets_to_themselves(
    monkeypatch: pytest.MonkeyPatch, qrm_settings: Settings, qrm_cli, dhcpd_bin: str
) -> None:  # type: ignore[no-untyped-def]
    dhcpd_env(monkeypatch, backend="isc")
    backend = get_backend(load_settings(), qrm_settings)
    backend.full_sync()
    path = backend.paths.config
    secret = backend.paths.omapi_secret.read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600
    assert backend.paths.omapi_secret.stat().st_mode & 0o777 == 0o600
    assert f'secret "{secret}";' in path.read_text()
    shown = qrm_cli("dhcpd", "show")
    assert shown.exit_code == 0 and secret not in shown.stdout and "omapi-key qrm-omapi;" in shown.stdout
    # a file someone made readable for their own server keeps its mode across rewrites
    path.chmod(0o640)
    backend.full_sync()
    assert path.stat().st_mode & 0o777 == 0o640
