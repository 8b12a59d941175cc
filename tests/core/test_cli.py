"""The qrm command line as users run it: openQRM's verbs, JSON, and clear errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _init(qrm_cli) -> None:
    result = qrm_cli("init")
    assert result.exit_code == 0, result.stderr


def test_article_walkthrough(qrm_cli, tmp_path: Path) -> None:
    _init(qrm_cli)
    r = qrm_cli("storage", "add", "-n", "NFS", "-t", "FAKE", "-i", "10.0.11.35", "-c", "QRMSRC")
    assert r.exit_code == 0, r.stderr
    assert "added storage server NFS" in r.stdout
    kernel, initrd = tmp_path / "k", tmp_path / "i"
    kernel.write_bytes(b"k" * 10)
    initrd.write_bytes(b"i" * 10)
    r = qrm_cli(
        "boot-image",
        "add",
        "-n",
        "qrm",
        "-k",
        "2.6.9-22.EL",
        "--kernel",
        str(kernel),
        "--initrd",
        str(initrd),
        "--default",
    )
    assert r.exit_code == 0, r.stderr
    r = qrm_cli("filesystem-image", "add", "-n", "centos", "-s", "NFS", "-l", "/exports/centos")
    assert r.exit_code == 0, r.stderr
    r = qrm_cli(
        "ve",
        "create",
        "-n",
        "web",
        "-b",
        "qrm",
        "-f",
        "centos",
        "--deployment",
        "shared",
        "--pool-size",
        "3",
        "--failover",
    )
    assert r.exit_code == 0, r.stderr
    listing = qrm_cli("ve", "list", "--output", "json").json()
    assert listing[0]["name"] == "web" and listing[0]["pool_size"] == 3 and listing[0]["failover"] is True
    show = qrm_cli("storage", "show", "NFS", "-o", "json").json()
    assert show["filesystem_images"] == ["centos"] and show["type"] == "fake"
    table = qrm_cli("storage", "list")
    assert "NFS" in table.stdout and "10.0.11.35" in table.stdout and "QRMSRC" in table.stdout
    events = qrm_cli("events", "--limit", "3", "-o", "json").json()
    assert [e["object_type"] for e in events] == ["boot-image", "filesystem-image", "ve"]
    assert all(e["actor"] == "tester" for e in events)


def test_json_shapes_are_stable(qrm_cli) -> None:
    _init(qrm_cli)
    qrm_cli("storage", "add", "-n", "s", "-t", "fake", "-i", "10.0.0.1")
    qrm_cli("resource", "add", "-m", "52:54:00:12:34:56", "-i", "10.0.0.7", "--cpus", "2", "--memory", "512")
    storage = qrm_cli("storage", "list", "-o", "json").json()[0]
    assert set(storage) == {
        "id",
        "name",
        "type",
        "address",
        "comment",
        "created_at",
        "filesystem_images",
        "settings",
        "managed_from",
    }
    resource = qrm_cli("resource", "show", "52:54:00:12:34:56", "-o", "json").json()
    assert {"id", "mac", "ip", "kind", "state", "ve", "cpus", "memory_mb", "last_seen", "health"} <= set(
        resource
    )
    assert resource["state"] == "new" and resource["memory_mb"] == 512


@pytest.mark.qrm_backends("sqlite")  # messages; duplicates and in-use refusals per database: test_services.py
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["storage", "add", "-n", "x", "-t", "nosuch", "-i", "10.0.0.1"],
            "unknown storage type 'nosuch'; installed: fake",
        ),
        (["storage", "add", "-n", "x", "-t", "fake", "-i", "10.0.0.999"], "invalid storage server address"),
        (["storage", "add", "-n", "dup", "-t", "fake", "-i", "10.0.0.1"], "already exists"),
        (["storage", "show", "nosuch"], "storage server 'nosuch' does not exist"),
        (["storage", "remove", "dup"], "holds filesystem image(s) img"),
        (
            ["filesystem-image", "add", "-n", "y", "-s", "nosuch", "-l", "/y"],
            "storage server 'nosuch' does not exist",
        ),
        (["ve", "create", "-n", "v", "-b", "nosuch", "-f", "img"], "boot image 'nosuch' does not exist"),
        (["resource", "add", "-m", "zz:zz"], "invalid MAC address"),
        (["resource", "show", "52:54:00:99:99:99"], "does not exist"),
        (["plugins", "enable", "nosuch"], "no plugin or driver named 'nosuch'"),
        (["events", "--limit", "0"], "limit must be between"),
    ],
)
def test_user_mistakes_are_one_line_and_change_nothing(qrm_cli, args, message) -> None:
    _init(qrm_cli)
    qrm_cli("storage", "add", "-n", "dup", "-t", "fake", "-i", "10.0.0.1")
    qrm_cli("filesystem-image", "add", "-n", "img", "-s", "dup", "-l", "/img")
    before = qrm_cli("events", "--limit", "100", "-o", "json").json()
    result = qrm_cli(*args)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert qrm_cli("events", "--limit", "100", "-o", "json").json() == before


@pytest.mark.qrm_backends("sqlite")  # the database plays no part
def test_usage_errors_exit_2(qrm_cli) -> None:
    result = qrm_cli("storage", "add", "-n", "x")
    assert result.exit_code == 2
    assert "Missing option" in result.stderr and "Traceback" not in result.stderr
    assert qrm_cli("nosuch").exit_code == 2


@pytest.mark.qrm_backends("sqlite")  # the database plays no part
def test_commands_before_init_say_so(qrm_cli, monkeypatch, tmp_path) -> None:
    from qrm_core.config import reset_settings_cache

    monkeypatch.setenv("QRM_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    reset_settings_cache()
    result = qrm_cli("storage", "list")
    assert result.exit_code == 1
    assert "run 'qrm init' first" in result.stderr


def test_init_is_idempotent_and_sets_the_admin_password(qrm_cli) -> None:
    first = qrm_cli("init", "-o", "json").json()
    assert first["admin_created"] and first["default_password"]
    again = qrm_cli("init", "--admin-password", "a-better-one", "-o", "json").json()
    assert not again["admin_created"] and not again["default_password"]
    assert again["revision_before"] == again["revision"]


def test_plugins_list_shows_the_fake_drivers(qrm_cli) -> None:
    _init(qrm_cli)
    entries = qrm_cli("plugins", "list", "-o", "json").json()
    fake = {(e["name"], e["kind"]) for e in entries if e["distribution"] == "qrm-core"}
    assert fake == {("fake", "storage"), ("fake", "hypervisor"), ("fake", "power")}
    assert qrm_cli("plugins", "disable", "fake").exit_code == 0
    entries = qrm_cli("plugins", "list", "-o", "json").json()
    assert all(e["status"] == "disabled" for e in entries if e["name"] == "fake")
    result = qrm_cli("storage", "add", "-n", "s", "-t", "fake", "-i", "10.0.0.1")
    assert result.exit_code == 1 and "disabled" in result.stderr
    assert qrm_cli("plugins", "enable", "fake").exit_code == 0
    assert qrm_cli("storage", "add", "-n", "s", "-t", "fake", "-i", "10.0.0.1").exit_code == 0


def test_logs_and_audit_log_are_written(qrm_cli, qrm_settings) -> None:
    _init(qrm_cli)
    qrm_cli("storage", "add", "-n", "s", "-t", "fake", "-i", "10.0.0.1", "-c", "two words")
    audit = (qrm_settings.effective_log_dir / "audit.log").read_text().splitlines()
    assert any("actor=tester object=storage:s level=info storage server s added" in line for line in audit)


def test_the_installed_qrm_command(tmp_path: Path) -> None:
    """The console script, in a fresh process on the embedded default: exit codes, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
    env["QRM_DATA_DIR"] = str(tmp_path / "data")
    exe = Path(sys.executable).parent / "qrm"
    run = lambda *a: subprocess.run([str(exe), *a], env=env, capture_output=True, text=True, timeout=120)
    assert run("init").returncode == 0
    ok = run("storage", "add", "-n", "NFS", "-t", "fake", "-i", "10.0.11.35", "-c", "QRMSRC", "-o", "json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == "NFS"
    bad = run("storage", "add", "-n", "NFS2", "-t", "fake", "-i", "not-an-ip")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: ")
    assert "Traceback" not in bad.stderr
    assert run("--version").stdout.startswith("qrm ")


@pytest.mark.qrm_backends("sqlite")  # the database plays no part
def test_invalid_settings_are_reported(qrm_cli, monkeypatch) -> None:
    from qrm_core.config import reset_settings_cache

    monkeypatch.setenv("QRM_DATABASE_URL", "nosuchdb://x")
    reset_settings_cache()
    result = qrm_cli("init")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


@pytest.mark.qrm_backends("sqlite")  # the database plays no part
def test_a_broken_configuration_file_is_one_line(qrm_cli, monkeypatch, tmp_path) -> None:
    from qrm_core.config import reset_settings_cache

    bad = tmp_path / "qrm.toml"
    bad.write_text("heartbeat_interval = [\n")
    monkeypatch.setenv("QRM_CONFIG", str(bad))
    reset_settings_cache()
    result = qrm_cli("storage", "list")
    assert result.exit_code == 1 and result.stderr.startswith("error: cannot read the configuration file")
    assert "Traceback" not in result.stderr


def test_events_follow_prints_new_events_as_they_happen(qrm_cli, qrm_settings) -> None:
    import signal
    import time

    assert qrm_cli("init").exit_code == 0
    env = {k: v for k, v in os.environ.items()}
    exe = Path(sys.executable).parent / "qrm"
    proc = subprocess.Popen(
        [str(exe), "events", "--follow", "--limit", "1", "-o", "json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(proc.stdout.readline())  # the newest existing event
        assert first["object_type"] in ("user", "site", "database")
        time.sleep(0.5)
        assert qrm_cli("storage", "add", "-n", "followed", "-t", "fake", "-i", "10.0.0.1").exit_code == 0
        line = json.loads(proc.stdout.readline())
        assert line["object_name"] == "followed" and line["actor"] == "tester"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr.read()


@pytest.mark.qrm_backends("sqlite")  # the database plays no part
def test_boot_image_create_refuses_remote_mode(qrm_cli) -> None:
    result = qrm_cli("--server", "http://127.0.0.1:9", "boot-image", "create", "-n", "x", "-k", "6.1")
    assert result.exit_code == 1 and "builds on the machine that keeps qrm's data" in result.stderr


def _lab_up_refused(qrm_cli, lab: Path, *args: str):
    """``qrm lab up`` that the test expects to be refused; should it start a lab
    after all, the lab is taken down again before the test fails."""
    result = qrm_cli("lab", "up", "--vms", "1", *args, "--dir", str(lab))
    if result.exit_code == 0:
        qrm_cli("lab", "down", "--dir", str(lab))
    return result


@pytest.mark.qrm_backends("sqlite")  # the database plays no part
def test_lab_up_without_the_network_boot_plugins_says_which(qrm_cli, tmp_path) -> None:
    """The core session has no plugin installed: the lab names what is missing."""
    from importlib.metadata import entry_points

    installed = {ep.name for ep in entry_points(group="qrm.plugins")}
    if installed & {"tftpd", "dhcpd", "ramdisk"}:
        pytest.skip(
            "network-boot plugins are installed here; this checks the core-only install (nox -s core)"
        )
    result = _lab_up_refused(qrm_cli, tmp_path / "lab")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    if os.geteuid() == 0:
        assert "qrm lab needs the plugins qrm-tftpd, qrm-dhcpd, qrm-ramdisk" in result.stderr
    else:
        assert "qrm lab needs root" in result.stderr
    assert not (tmp_path / "lab").exists() or not any((tmp_path / "lab").iterdir())


@pytest.mark.qrm_backends("sqlite")  # the database plays no part
def test_lab_uefi_machines_without_ovmf_say_what_to_install(qrm_cli, tmp_path, monkeypatch) -> None:
    from qrm_core.lab import qemu

    monkeypatch.setattr(qemu, "OVMF_PAIRS", ((tmp_path / "OVMF_CODE.fd", tmp_path / "OVMF_VARS.fd"),))
    result = _lab_up_refused(qrm_cli, tmp_path / "lab", "--firmware", "uefi")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    if os.geteuid() == 0:
        assert re.search(r"qrm lab needs .*\bovmf\b.*: apt-get install .*\bovmf\b", result.stderr), (
            result.stderr
        )
    else:
        assert "qrm lab needs root" in result.stderr
    assert not (tmp_path / "lab").exists() or not any((tmp_path / "lab").iterdir())


def test_lab_machine_command_lines_bios_and_uefi(tmp_path, monkeypatch) -> None:
    """BIOS: QEMU's defaults (SeaBIOS, the NIC's iPXE ROM). UEFI: OVMF's code read-only, the
    machine's own variables writable, and no ROM (OVMF's own PXE client boots)."""
    from qrm_core.lab import qemu

    code, template = tmp_path / "CODE,4M.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"code")
    template.write_bytes(b"vars")
    monkeypatch.setattr(qemu, "OVMF_PAIRS", ((code, template),))
    bios = qemu.qemu_argv(qemu.vm_spec(1, cpus=1, memory_mb=256), tmp_path / "console.log")
    assert not any("pflash" in arg for arg in bios)
    assert bios[bios.index("-device") + 1] == "virtio-net-pci,netdev=net0,mac=52:54:00:77:00:01"
    assert qemu.firmware_list("BIOS, uefi", 2) == ["bios", "uefi"]
    spec = qemu.vm_spec(2, cpus=1, memory_mb=256, firmware=qemu.firmware_list("uefi", 2)[1])
    assert qemu.VmSpec.from_dict(spec.to_dict()) == spec
    variables = qemu.make_vars(tmp_path / "vm2" / qemu.VARS_FILE, fresh=True)
    variables.write_bytes(b"written by the firmware")
    assert qemu.make_vars(variables, fresh=False).read_bytes() == b"written by the firmware"
    assert qemu.make_vars(variables, fresh=True).read_bytes() == b"vars"
    uefi = qemu.qemu_argv(spec, tmp_path / "console.log", variables)
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={tmp_path}/CODE,,4M.fd" in uefi
    assert f"if=pflash,format=raw,unit=1,file={variables}" in uefi
    assert uefi[uefi.index("-device") + 1] == "virtio-net-pci,netdev=net0,mac=52:54:00:77:00:02,romfile="


@pytest.mark.qrm_backends("sqlite")  # the database plays no part
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("-u", "qrm", "-p", "wrong"), "-u/-p are for --server"),
        (("-p", "wrong"), "-p is for --server"),
        (("--token", "t"), "--token is for --server"),
    ],
)
def test_credentials_without_a_server_are_refused(qrm_cli, args, named) -> None:
    """`qrm -u qrm -p wrong storage list` used to run on the local database and
    exit 0: credentials without --server are refused in one line, nothing done."""
    _init(qrm_cli)
    result = qrm_cli(*args, "storage", "add", "-n", "s1", "-t", "fake", "-i", "10.0.0.5")
    assert result.exit_code == 1, result.stdout
    assert named in result.stderr and "add --server URL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert qrm_cli("storage", "list", "-o", "json").json() == []
