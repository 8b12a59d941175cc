"""Issue 15, item 10: names unique regardless of case, addresses that are no
machine's refused for storage servers, hostile locations, run.sh's URL, a
remote CLI that keeps nothing locally, simulations with their own MACs that
survive an enrollment-token rotation, and tables that stay one row per line
when piped."""

from __future__ import annotations

import asyncio
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import select

from qrm_core.config import reset_settings_cache
from qrm_core.errors import AlreadyExists, InvalidInput
from qrm_core.lab.simulate import NodeSpec, Simulation, free_run, mac_for, node_specs
from qrm_core.models import Resource
from qrm_core.services import agent, boot_images, resources, service_context, site, storage, tokens, users
from qrm_core.services import virtual_environments as ves

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------


def test_names_that_differ_only_in_case_are_one_name(qrm_ctx) -> None:
    storage.add_storage(qrm_ctx, name="nfs", type="fake", address="10.0.0.1")
    with pytest.raises(AlreadyExists, match="storage server 'nfs' already exists"):
        storage.add_storage(qrm_ctx, name="NFS", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="Web-Root", storage="nfs", size_mb=10)
    with pytest.raises(AlreadyExists, match="filesystem image 'Web-Root' already exists"):
        storage.add_filesystem_image(qrm_ctx, name="web-root", storage="nfs", size_mb=10)
    boot_images.add_boot_image(qrm_ctx, name="default", kernel_version="6.1")
    with pytest.raises(AlreadyExists, match="boot image 'default' already exists"):
        boot_images.add_boot_image(qrm_ctx, name="DEFAULT", kernel_version="6.1")
    ves.create_ve(qrm_ctx, name="web", boot_image="default", fs_image="Web-Root")
    with pytest.raises(AlreadyExists, match="virtual environment 'web' already exists"):
        ves.create_ve(qrm_ctx, name="Web", boot_image="default", fs_image="Web-Root")
    resources.add_resource(qrm_ctx, mac="52:54:00:00:00:01", hostname="node1")
    with pytest.raises(AlreadyExists, match="a resource named 'node1' already exists"):
        resources.add_resource(qrm_ctx, mac="52:54:00:00:00:02", hostname="NODE1")
    users.create_user(qrm_ctx, name="ann", password="ann-password")
    with pytest.raises(AlreadyExists, match="user 'ann' already exists"):
        users.create_user(qrm_ctx, name="Ann", password="ann-password")
    tokens.create_token(qrm_ctx, name="ci", user="ann", admin=True)
    with pytest.raises(AlreadyExists, match="already has an API token named"):
        tokens.create_token(qrm_ctx, name="CI", user="ann", admin=True)
    # Nothing of the refused ones was kept.
    assert [s.name for s in storage.list_storage(qrm_ctx)] == ["nfs"]
    assert [r.hostname for r in qrm_ctx.session.exec(select(Resource))] == ["node1"]


def test_the_cli_refuses_nfs_beside_NFS(qrm_cli) -> None:
    assert qrm_cli("init").exit_code == 0
    assert qrm_cli("storage", "add", "-n", "NFS", "-t", "fake", "-i", "10.0.11.35").exit_code == 0
    again = qrm_cli("storage", "add", "-n", "nfs", "-t", "fake", "-i", "10.0.11.36")
    assert again.exit_code == 1 and again.stderr == "error: storage server 'NFS' already exists\n"


# ---------------------------------------------------------------------------
# Storage server addresses and locations
# ---------------------------------------------------------------------------


@pytest.mark.qrm_backends("sqlite")
@pytest.mark.parametrize(
    "address, why",
    [
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("224.0.0.1", "multicast"),
        ("239.1.2.3", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
    ],
)
def test_storage_servers_need_one_machines_address(qrm_ctx, address, why) -> None:
    with pytest.raises(InvalidInput, match=why) as refused:
        storage.add_storage(qrm_ctx, name="s1", type="fake", address=address)
    assert "\n" not in refused.value.message
    assert storage.list_storage(qrm_ctx) == []


@pytest.mark.qrm_backends("sqlite")
def test_usable_addresses_are_kept(qrm_ctx) -> None:
    for n, address in enumerate(("10.0.0.1", "192.168.1.255", "127.0.0.1", "fe80::1", "2001:db8::5")):
        storage.add_storage(qrm_ctx, name=f"s{n}", type="fake", address=address)
    assert len(storage.list_storage(qrm_ctx)) == 5


@pytest.mark.qrm_backends("sqlite")
def test_the_fake_driver_refuses_hostile_locations_in_one_line(qrm_cli) -> None:
    assert qrm_cli("init").exit_code == 0
    assert qrm_cli("storage", "add", "-n", "nfs", "-t", "fake", "-i", "10.0.0.1").exit_code == 0
    for location in ("/vol/a\nb", "/" + "a" * 5000, "/vol/" + "b/" * 200 + "c"):
        added = qrm_cli("filesystem-image", "add", "-n", "img", "-s", "nfs", "-l", location)
        assert added.exit_code == 1 and added.stderr.count("\n") == 1, added.stderr
        assert len(added.stderr) < 400
    listed = qrm_cli("filesystem-image", "list")
    assert listed.stdout == "(no filesystem images)\n"


# ---------------------------------------------------------------------------
# scripts/run.sh
# ---------------------------------------------------------------------------


def _run_sh(tmp_path: Path, *args: str) -> list[str]:
    """scripts/run.sh in a copy of the tree whose .venv's qrm records its arguments."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "run.sh", tmp_path / "scripts" / "run.sh")
    (tmp_path / "scripts" / "system-packages.sh").write_text("exit 0\n")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    qrm = venv / "qrm"
    qrm.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    qrm.chmod(qrm.stat().st_mode | stat.S_IEXEC)
    (tmp_path / ".venv" / ".qrm-installed").touch()
    done = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "run.sh"), *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "init" and calls[1].startswith("server --host 127.0.0.1 --port 8080")
    return done.stdout.splitlines()


@pytest.mark.parametrize(
    "args, url",
    [
        ((), "http://127.0.0.1:8080"),
        (("--port", "8081"), "http://127.0.0.1:8081"),
        (("--port=9000",), "http://127.0.0.1:9000"),
        (("--host", "127.0.0.2", "--port", "8082"), "http://127.0.0.2:8082"),
    ],
)
def test_run_sh_prints_the_address_the_server_listens_on(tmp_path, args, url) -> None:
    said = _run_sh(tmp_path, *args)
    assert f"qrm server: {url} " in said[0]
    assert "8080" not in said[0] or url.endswith(":8080")


# ---------------------------------------------------------------------------
# The remote CLI keeps nothing on this machine
# ---------------------------------------------------------------------------


@pytest.mark.qrm_backends("sqlite")
def test_a_remote_cli_call_creates_no_local_database_or_logs(
    qrm_server, qrm_cli, tmp_path, monkeypatch
) -> None:
    elsewhere = tmp_path / "laptop"
    monkeypatch.setenv("QRM_DATA_DIR", str(elsewhere))
    monkeypatch.delenv("QRM_DATABASE_URL")
    reset_settings_cache()
    listed = qrm_cli("--server", qrm_server.url, "-u", "qrm", "-p", "qrm", "storage", "list")
    assert listed.exit_code == 0, listed.stderr
    refused = qrm_cli("--server", qrm_server.url, "-u", "qrm", "-p", "wrong", "storage", "list")
    assert refused.exit_code == 1 and refused.stderr == "error: wrong user name or password\n"
    monkeypatch.setenv("QRM_SERVER", "http://127.0.0.1:9")
    reset_settings_cache()
    by_env = qrm_cli("storage", "list")
    assert by_env.exit_code == 1 and "cannot reach the qrm server" in by_env.stderr
    assert not elsewhere.exists(), sorted(str(p) for p in elsewhere.rglob("*"))


# ---------------------------------------------------------------------------
# qrm lab simulate
# ---------------------------------------------------------------------------


def test_each_simulation_takes_macs_no_known_machine_has() -> None:
    first = node_specs(3, hypervisor_hosts=1, run=free_run([]))
    known = [s.mac for s in first] + ["52:54:00:12:34:56"]
    for _ in range(50):
        second = node_specs(3, hypervisor_hosts=1, run=free_run(known))
        assert not {s.mac for s in second} & set(known)
        # Every machine has an address of its own (a VE's exports name it).
        ips = [s.ip for s in first + second]
        assert None not in ips and len(set(ips)) == len(ips), ips
    every = [mac_for(1, run=run) for run in range(1, 256)]
    with pytest.raises(InvalidInput, match="every simulated MAC block"):
        free_run(every)


@pytest.mark.qrm_backends("sqlite")
def test_two_simulate_runs_use_different_macs(qrm_server, qrm_cli) -> None:
    remote = ("--server", qrm_server.url, "-u", "qrm", "-p", "qrm")
    for _ in range(2):
        ran = qrm_cli(
            *remote, "lab", "simulate", "-n", "3", "--duration", "1.5", "--agent-url", qrm_server.url
        )
        assert ran.exit_code == 0, ran.stderr
    listed = qrm_cli(*remote, "resource", "list", "-o", "json").json()
    macs = [r["mac"] for r in listed]
    assert len(macs) == len(set(macs)) == 6, macs
    assert len({m.split(":")[2] for m in macs}) == 2


def _simulate(server, run: int, **kwargs):
    sim = Simulation(server.url, server.enrollment_token(), reboot_delay=0.1, **kwargs)
    loop = asyncio.new_event_loop()
    spec = NodeSpec(mac=mac_for(1, run=run), ip=f"198.18.0.{run}")
    thread = threading.Thread(target=lambda: loop.run_until_complete(sim.run([spec])), daemon=True)
    thread.start()
    return sim, loop, thread, spec


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.qrm_backends("sqlite")
def test_simulated_machines_survive_an_enrollment_token_rotation_or_say_so(qrm_server) -> None:
    """One simulation can fetch the site's token (the CLI's default): it comes
    back. One was given its token (--enroll): it says, once, what to do."""
    fetching: list[str] = []
    given: list[str] = []
    running = [
        _simulate(qrm_server, 7, enrollment=qrm_server.enrollment_token, report=fetching.append),
        _simulate(qrm_server, 8, report=given.append),
    ]
    try:
        _wait(lambda: all(sim.stats.registrations == 1 for sim, *_ in running))
        with service_context(qrm_server.settings, plugins=qrm_server.plugins) as ctx:
            site.rotate_enrollment_token(ctx)
        time.sleep(5.5)  # servers re-read the site's token every 5 s
        with service_context(qrm_server.settings, plugins=qrm_server.plugins) as ctx:
            for _sim, _loop, _thread, spec in running:
                agent.order_reboot(ctx, spec.mac)
        _wait(lambda: running[0][0].stats.registrations == 2 and bool(given))
        assert fetching == [
            "the site's enrollment token changed: simulated machines register with the new one"
        ]
        time.sleep(1.0)  # further refusals are not repeated
        assert len(given) == 1 and "refuses the simulated machines' enrollment token" in given[0], given
        assert "--enroll" in given[0] and running[1][0].stats.registrations == 1
    finally:
        for sim, loop, thread, _spec in running:
            loop.call_soon_threadsafe(sim.stopping.set)
            thread.join(30)


# ---------------------------------------------------------------------------
# Piped tables
# ---------------------------------------------------------------------------


@pytest.mark.qrm_backends("sqlite")
def test_piped_tables_keep_every_value_whole_on_its_line(qrm_cli, monkeypatch) -> None:
    # qrm_cli's output is not a terminal, as under '| cat'; a narrow width must not matter then.
    monkeypatch.setenv("COLUMNS", "40")
    assert qrm_cli("init").exit_code == 0
    macs = [f"52:54:00:aa:bb:{n:02x}" for n in range(3)]
    for n, mac in enumerate(macs):
        added = qrm_cli(
            "resource", "add", "--mac", mac, "--ip", f"10.1.0.{n + 1}", "--hostname", f"rack4-slot7-n{n}"
        )
        assert added.exit_code == 0, added.stderr
    listed = qrm_cli("resource", "list")
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "MAC"], listed.stdout
    assert len(lines) == 1 + len(macs), listed.stdout
    for n, (line, mac) in enumerate(zip(lines[1:], macs, strict=True)):
        assert mac in line.split() and f"rack4-slot7-n{n}" in line.split(), line
    shown = qrm_cli("resource", "show", macs[0]).stdout.splitlines()
    assert [line.split() for line in shown if line.startswith("mac ")] == [["mac", macs[0]]]
