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
