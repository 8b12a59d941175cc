"""The node agent script itself: POSIX syntax, its strict JSON parser, its input checks.

These run the script with busybox sh (the shell of the initrd); the protocol
conversation is in test_node_agent.py and test_boot_qemu.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from qrm_core.bootimage.builder import agent_script
from qrm_core.testing import missing

BUSYBOX = "/bin/busybox"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path(BUSYBOX).is_file():
        missing("busybox-static", "apt-get install busybox-static")
    path = tmp_path_factory.mktemp("agent") / "agent.sh"
    path.write_bytes(agent_script())
    return path


def parse(agent: Path, text: str) -> tuple[int, list[list[str]]]:
    done = subprocess.run(
        [BUSYBOX, "sh", str(agent), "--json"], input=text.encode(), capture_output=True, timeout=30
    )
    rows = [line.split("\t") for line in done.stdout.decode().splitlines()]
    return done.returncode, rows


def test_syntax_with_busybox_and_dash(agent: Path) -> None:
    subprocess.run([BUSYBOX, "sh", "-n", str(agent)], check=True)
    if shutil.which("dash"):
        subprocess.run(["dash", "-n", str(agent)], check=True)


def test_json_answers_are_parsed(agent: Path) -> None:
    code, rows = parse(
        agent,
        '{"resource_id": 7, "token": "a-B_c.~+/=", "heartbeat_interval": 10.0,'
        ' "state": "idle", "boot_generation": 0, "x": [1, {"y": [true, null]}], "z": {"a": "b"}}',
    )
    assert code == 0
    assert rows == [
        ["resource_id", "number", "7"],
        ["token", "string", "a-B_c.~+/="],
        ["heartbeat_interval", "number", "10.0"],
        ["state", "string", "idle"],
        ["boot_generation", "number", "0"],
        ["x", "array", ""],
        ["z", "object", ""],
    ]
    assert parse(agent, ' \n{"command" : "reboot",\n "n": -1.5e3, "t": false, "u": null}\n ')[1] == [
        ["command", "string", "reboot"],
        ["n", "number", "-1.5e3"],
        ["t", "bool", "false"],
        ["u", "null", ""],
    ]
    # Escapes decode; control characters never reach the output.
    assert parse(agent, r'{"a": "q\"b\\s\/", "b": "x\ny\u0041"}')[1] == [
        ["a", "string", 'q"b\\s/'],
        ["b", "string", "x?y?"],
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[1, 2]",
        '"reboot"',
        "<html>502 Bad Gateway</html>",
        '{"command": "reboot"',
        '{"command": "reboot",}',
        '{"command": "reboot"} {"command": "halt"}',
        '{"command": "reboot", "command": "none"}',
        '{"command": reboot}',
        '{command: "reboot"}',
        "{'command': 'reboot'}",
        '{"a": 01}',
        '{"a": 1.}',
        '{"a": tru}',
        '{"a": "\\x"}',
        '{"a": "\\u12"}',
        '{"a": "tab\there"}',
        '{"a": [1, 2}',
        '{"a": ' + "[" * 30 + "]" * 30 + "}",
    ],
)
def test_malformed_json_is_refused(agent: Path, text: str) -> None:
    code, rows = parse(agent, text)
    assert code == 1 and rows == []


def test_oversized_answers_are_refused(agent: Path) -> None:
    assert parse(agent, '{"a": "' + "x" * 70000 + '"}')[0] == 1


def functions(agent: Path, names: list[str]) -> str:
    """The text of some shell functions of the agent (to test them alone)."""
    text = agent.read_text()
    out = []
    for name in names:
        start = text.index(f"\n{name}() {{\n") + 1
        end = text.index("\n}\n", start) + 3
        out.append(text[start:end])
    return "".join(out)


@pytest.mark.parametrize(
    ("function", "value", "ok"),
    [
        ("is_mac", "52:54:00:12:34:56", True),
        ("is_mac", "52:54:00:12:34:5G", False),
        ("is_mac", "52:54:00:12:34:56;reboot", False),
        ("is_token", "abc-DEF_1.~+/=", True),
        ("is_token", "abc def", False),
        ("is_token", "abc\r\nX-Evil: 1", False),
        ("is_token", "", False),
        ("is_uint", "12", True),
        ("is_uint", "1 2", False),
        ("is_uint", "-1", False),
        ("is_decimal", "0.25", True),
        ("is_decimal", "1e9", False),
        ("is_decimal", "1.2.3", False),
        ("is_url", "http://10.0.0.1:8080", True),
        ("is_url", "http://x/a?b=[1]&c=%20", True),
        ("is_url", "http://x/$(reboot)", False),
        ("is_url", "http://x/`id`", False),
        ("is_url", "ftp://x/", False),
        ("is_ipv4", "10.0.0.1", True),
        ("is_ipv4", "10.0.0.256", False),
        ("is_ipv4", "10.0.0", False),
        ("is_hostname", "node-1", True),
        ("is_hostname", "-node", False),
        ("is_hostname", "a;b", False),
    ],
)
def test_input_checks(agent: Path, function: str, value: str, ok: bool) -> None:
    script = functions(
        agent, ["is_uint", "is_decimal", "is_token", "is_mac", "is_url", "is_ipv4", "is_hostname"]
    )
    done = subprocess.run(
        [BUSYBOX, "sh", "-c", script + f'\n{function} "$1"', "sh", value], capture_output=True, timeout=10
    )
    assert (done.returncode == 0) is ok


def test_mask_to_prefix(agent: Path) -> None:
    script = functions(agent, ["mask_to_prefix"])
    for mask, prefix in (("255.255.255.0", "24"), ("255.255.240.0", "20"), ("255.255.255.252", "30")):
        done = subprocess.run(
            [BUSYBOX, "sh", "-c", script + '\nmask_to_prefix "$1"', "sh", mask],
            capture_output=True,
            text=True,
        )
        assert done.stdout.strip() == prefix


def root_plan(agent: Path, cmdline: str) -> tuple[str, str]:
    done = subprocess.run(
        [BUSYBOX, "sh", str(agent), "--root-plan"],
        capture_output=True,
        text=True,
        timeout=10,
        env={"QRM_AGENT_CMDLINE": cmdline, "PATH": "/usr/bin:/bin"},
    )
    plan, error = done.stdout.splitlines()
    return plan.strip(), error.removeprefix("error=")


@pytest.mark.parametrize(
    ("cmdline", "plan"),
    [
        (
            "root=/dev/nfs nfsroot=10.0.11.35:/exports/web,vers=3,tcp rw",
            "kind=nfs mode=rw overlay= 10.0.11.35:/exports/web options=vers=3,tcp",
        ),
        (
            "root=/dev/nfs nfsroot=10.0.11.35:/exports/web ro qrm.overlay=tmpfs",
            "kind=nfs mode=ro overlay=tmpfs 10.0.11.35:/exports/web options=",
        ),
        # An overlay makes the image read-only whatever else the line says.
        (
            "qrm.iscsi=10.0.11.36:3260:1:iqn.2024-01.org.qrm:st.web qrm.initiator=iqn.2005-03.org.qrm:node-1 "
            "rootfstype=ext4 rw qrm.overlay=tmpfs",
            "kind=iscsi mode=ro overlay=tmpfs 10.0.11.36:3260 lun=1 target=iqn.2024-01.org.qrm:st.web "
            "initiator=iqn.2005-03.org.qrm:node-1 fstype=ext4",
        ),
        (
            "qrm.rootfs=http://10.0.0.1:8080/r.tar.gz",
            "kind=archive mode=rw overlay= http://10.0.0.1:8080/r.tar.gz",
        ),
        ("console=ttyS0", "kind= mode=rw overlay="),
    ],
)
def test_root_arguments(agent: Path, cmdline: str, plan: str) -> None:
    assert root_plan(agent, cmdline) == (plan, "")


@pytest.mark.parametrize(
    ("cmdline", "error"),
    [
        ("root=/dev/nfs nfsroot=10.0.11.35", "invalid nfsroot=10.0.11.35"),
        ("root=/dev/nfs nfsroot=host.example:/x", "invalid nfsroot=host.example:/x"),
        ("root=/dev/nfs nfsroot=10.0.11.35:/x/../etc", "invalid nfsroot=10.0.11.35:/x/../etc"),
        ("root=/dev/nfs nfsroot=10.0.11.35:/x;reboot", "invalid nfsroot=10.0.11.35:/x;reboot"),
        (
            "root=/dev/nfs nfsroot=10.0.11.35:/x,vers=3,$(reboot)",
            "invalid nfsroot=10.0.11.35:/x,vers=3,(reboot)",
        ),
        ("root=/dev/nfs nfsroot=10.0.11.35:/x,Port=99", "invalid nfsroot=10.0.11.35:/x,Port=99"),
        ("qrm.iscsi=10.0.11.36:3260:1:not-an-iqn", "invalid qrm.iscsi=10.0.11.36:3260:1:not-an-iqn"),
        ("qrm.iscsi=10.0.11.36:99999:1:iqn.2024-01.org.qrm:x", "invalid qrm.iscsi="),
        ("qrm.iscsi=10.0.11.36:3260:x:iqn.2024-01.org.qrm:x", "invalid qrm.iscsi="),
        ("qrm.iscsi=10.0.11.36:3260:1:iqn.2024-01.org.qrm:x`id`", "invalid qrm.iscsi="),
        (
            "qrm.iscsi=10.0.11.36:3260:1:iqn.2024-01.org.qrm:x qrm.initiator=iqn.x;y",
            "invalid qrm.initiator=iqn.x;y",
        ),
        ("qrm.iscsi=10.0.11.36:3260:1:iqn.2024-01.org.qrm:x rootfstype=vfat", "unsupported rootfstype=vfat"),
        ("root=/dev/nfs nfsroot=10.0.11.35:/x qrm.overlay=disk", "unknown qrm.overlay=disk (only tmpfs)"),
    ],
)
def test_malformed_root_arguments_are_refused(agent: Path, cmdline: str, error: str) -> None:
    _, said = root_plan(agent, cmdline)
    assert said.startswith(error), said
    # What the agent says is fit for a heartbeat's reason: no shell or JSON metacharacters.
    assert not set(said) & set("`$\"'\\<>|&")


@pytest.mark.parametrize(
    ("sockets", "xen", "qemu", "expected"),
    [
        ((), "", True, "[]"),  # QEMU installed, no libvirt daemon: not a host
        (("libvirt-sock",), "", True, '["qemu"]'),
        (("virtqemud-sock",), "", True, '["qemu"]'),
        (("libvirt-sock",), "control_d\n", False, '["xen"]'),
        (("libvirt-sock",), "control_d\n", True, '["xen", "qemu"]'),
        (("libvirt-sock",), "", False, "[]"),  # a daemon with nothing to run
        (("libvirt-sock",), "\n", False, "[]"),  # a Xen guest (domU), not dom0
    ],
)
def test_a_running_libvirt_daemon_makes_a_host(
    agent: Path, tmp_path: Path, sockets, xen, qemu, expected
) -> None:
    """detect_hypervisors: what register() reports in "hypervisors" (the server keeps it as
    the machine's capabilities, which make it a host of those hypervisors)."""
    import socket as sockets_module

    run = tmp_path / "run"
    run.mkdir()
    made = []
    for name in sockets:
        sock = sockets_module.socket(sockets_module.AF_UNIX)
        sock.bind(str(run / name))
        made.append(sock)
    caps = tmp_path / "capabilities"
    if xen:
        caps.write_text(xen)
    binary = tmp_path / "qemu-system-x86_64"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755 if qemu else 0o644)
    setup = (
        f'LIBVIRT_SOCKETS="{run}/libvirt-sock {run}/virtqemud-sock"\n'
        f"XEN_CAPABILITIES={caps}\nQEMU_BINARIES={binary}\n"
    )
    try:
        done = subprocess.run(
            [BUSYBOX, "sh", "-c", setup + functions(agent, ["detect_hypervisors"]) + "detect_hypervisors"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    finally:
        for sock in made:
            sock.close()
    assert (done.returncode, done.stdout) == (0, expected)


# ---------------------------------------------------------------------------
# Filling the VE's image from the local disk (qrm.fill=local-disk[:/dev/DEVICE])
# ---------------------------------------------------------------------------


def fill_plan(agent: Path, cmdline: str) -> str:
    done = subprocess.run(
        [BUSYBOX, "sh", str(agent), "--root-plan"],
        capture_output=True,
        text=True,
        timeout=10,
        env={"QRM_AGENT_CMDLINE": cmdline, "PATH": "/usr/bin:/bin"},
    )
    return done.stdout.splitlines()[2]


NFS = "root=/dev/nfs nfsroot=10.0.11.35:/exports/web rw "


@pytest.mark.parametrize(
    ("args", "plan"),
    [
        ("qrm.fill=local-disk qrm.fill_mb=512", "fill=local-disk device= mb=512 error="),
        ("qrm.fill=local-disk:/dev/vdb1", "fill=local-disk:/dev/vdb1 device=/dev/vdb1 mb= error="),
        (
            "qrm.fill=local-disk:/dev/disk/by-label/root",
            "fill=local-disk:/dev/disk/by-label/root device=/dev/disk/by-label/root mb= error=",
        ),
        ("qrm.fill=local-disk:/dev/../x", "fill=local-disk:/dev/../x device= mb= error=invalid qrm.fill="),
        ("qrm.fill=local-disk:/dev/.x", "fill=local-disk:/dev/.x device= mb= error=invalid qrm.fill="),
        ("qrm.fill=local-disk:/etc/x", "fill=local-disk:/etc/x device= mb= error=invalid qrm.fill="),
        (
            "qrm.fill=local-disk:/dev/x;reboot",
            "fill=local-disk:/dev/x;reboot device= mb= error=invalid qrm.fill=",
        ),
        ("qrm.fill=disk", "fill=disk device= mb= error=unknown qrm.fill=disk"),
        ("qrm.fill=local-disk qrm.fill_mb=1e9", "fill=local-disk device= mb= error=invalid qrm.fill_mb=1e9"),
    ],
)
def test_fill_arguments(agent: Path, args: str, plan: str) -> None:
    said = fill_plan(agent, NFS + args)
    assert said.startswith(plan), said
    assert not set(said.partition(" error=")[2]) & set("`$\"'\\<>|&")


SCRIPT_STUBS = """
log() { :; }
heartbeat() { printf '{"state": "%s"%s}\\n' "$STATE" "$FILL_FIELDS" >>"$RUN/beats"; }
"""
FILL_FUNCTIONS = ["is_uint", "is_device", "first_error", "fill_heartbeat", "fill_copy", "local_devices"]


def run_fill(agent: Path, tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess[str]:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    setup = f"RUN={run}\nINTERVAL=1\nSTATE=filling\nFILL_DEVICE=/dev/vdb1\nSYS_BLOCK=${{QRM_AGENT_SYS_BLOCK:-/sys/class/block}}\n"
    return subprocess.run(
        [BUSYBOX, "sh", "-c", SCRIPT_STUBS + functions(agent, FILL_FUNCTIONS) + setup + body],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=tmp_path,
    )


def test_fill_copy_keeps_the_tree_and_reports_progress(agent: Path, tmp_path: Path) -> None:
    """fill_copy: the target emptied first (a retry starts again), everything copied with
    links, modes and special files, progress heartbeats in bytes of the total."""
    import json
    import os

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "etc").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "etc" / "marker").write_text("from the local disk\n")
    (src / "etc" / "marker").chmod(0o640)
    os.link(src / "etc" / "marker", src / "etc" / "hard")
    (src / "bin" / "sh").symlink_to("busybox")
    (src / "bin" / "busybox").write_bytes(os.urandom(3 << 20))
    os.mkfifo(src / "etc" / "fifo")
    (dst / "stale").mkdir(parents=True)
    (dst / ".stale").write_text("from a half-made try")
    done = run_fill(
        agent, tmp_path, f'FILL_MB=8\nfill_copy {src} {dst}; echo "rc=$? $FILL_BYTES $FILL_TOTAL $FILL_ERROR"'
    )
    rc, copied, total = done.stdout.split()[:3]
    assert rc == "rc=0" and copied == total and int(total) >= 3 << 20, done.stdout + done.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["bin", "etc"]
    assert (dst / "etc" / "marker").read_text() == "from the local disk\n"
    assert (dst / "etc" / "marker").stat().st_mode & 0o777 == 0o640
    assert (dst / "etc" / "hard").stat().st_ino == (dst / "etc" / "marker").stat().st_ino
    assert os.readlink(dst / "bin" / "sh") == "busybox"
    assert (dst / "etc" / "fifo").is_fifo()
    beats = [json.loads(line) for line in (tmp_path / "run" / "beats").read_text().splitlines()]
    assert beats and all(b["state"] == "filling" and b["fill_total"] == int(total) for b in beats)
    assert beats[0]["fill_device"] == "/dev/vdb1" and "fill_result" not in beats[0]


def test_fill_copy_refuses_a_volume_too_small(agent: Path, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "big").write_bytes(b"x" * (3 << 20 | 1))
    done = run_fill(agent, tmp_path, f'FILL_MB=2\nfill_copy {src} {dst}; echo "rc=$? $FILL_ERROR"')
    assert done.stdout.strip() == "rc=1 the volume is too small: /dev/vdb1 holds 4 MB, the image 2 MB", (
        done.stdout + done.stderr
    )
    assert list(dst.iterdir()) == []


def test_fill_copy_says_why_a_copy_failed(agent: Path, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "etc").mkdir()
    (src / "etc" / "marker").write_text("x")
    dst.write_text("not a directory")
    done = run_fill(agent, tmp_path, f'fill_copy {src} {dst}; echo "rc=$? $FILL_ERROR"')
    assert done.stdout.startswith("rc=1 copying /dev/vdb1 failed: "), done.stdout + done.stderr


def test_local_devices_are_partitions_and_unpartitioned_disks(agent: Path, tmp_path: Path) -> None:
    """local_devices: partitions, and whole disks without partitions, in name order; no
    loop, RAM or CD devices, nothing empty, nothing mounted."""
    sys_block = tmp_path / "block"

    def dev(name: str, size: int = 2048, parent: Path | None = None, partition: bool = False) -> Path:
        path = (parent or sys_block) / name
        path.mkdir(parents=True)
        (path / "size").write_text(f"{size}\n")
        if partition:
            (path / "partition").write_text("1\n")
        if parent is not None:
            (sys_block / name).symlink_to(path)
        return path

    sda = dev("qrmtsda")
    dev("qrmtsda1", parent=sda, partition=True)
    dev("qrmtsda2", parent=sda, partition=True, size=0)
    dev("qrmtvdb")  # a whole disk with a filesystem on it
    dev("loop0")
    dev("sr0")
    dev("ram0")
    dev("qrmtvdc", size=0)
    done = run_fill(agent, tmp_path, "local_devices", QRM_AGENT_SYS_BLOCK=str(sys_block))
    assert done.stdout.split() == ["/dev/qrmtsda1", "/dev/qrmtvdb"], done.stderr
