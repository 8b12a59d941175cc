"""The node agent speaking the protocol over a real network: busybox sh, udhcpc and
wget in one network namespace; busybox udhcpd and the real ``qrm server`` in another.

The agent runs as an ordinary process here (not PID 1), so it mounts nothing,
loads no modules, and its reboot and halt commands leave marker files; the
QEMU test (test_boot_qemu.py) runs the same script as a real /init.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agentlab import (
    IP,
    AgentPeer,
    AgentProcess,
    Netns,
    QrmServerProcess,
    Udhcpd,
    applet_dir,
    memory_mb_like_agent,
    run,
)

from qrm_core.bootimage.builder import agent_script
from qrm_core.models import ResourceState
from qrm_core.services import agent as agent_service
from qrm_core.testkit import wait_until

SERVER_IP = "10.231.0.1"
POOL = ("10.231.0.100", "10.231.0.150")


@dataclass
class Lab:
    server_ns: Netns
    node_ns: Netns
    server: QrmServerProcess
    work: Path
    script: Path
    applets: Path

    def agent(self, name: str, mac: str, cmdline: str) -> AgentProcess:
        self.node_ns.ip("link", "set", "dev", "vn", "address", mac)
        return AgentProcess(self.node_ns, self.script, self.work / name, cmdline, self.applets)


@pytest.fixture(scope="module")
def lab(root_and_netns: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("agentlab")
    script = work / "agent.sh"
    script.write_bytes(agent_script())
    server_ns, node_ns = Netns("as"), Netns("an")
    udhcpd = server = None
    try:
        server_ns.ip("link", "add", "vs", "type", "veth", "peer", "name", "vn", "netns", node_ns.name)
        server_ns.ip("addr", "add", f"{SERVER_IP}/24", "dev", "vs")
        server_ns.ip("link", "set", "vs", "up")
        udhcpd = Udhcpd(
            server_ns, "vs", work / "dhcp", *POOL, options=(f"router {SERVER_IP}", "hostname node-7")
        )
        server = QrmServerProcess(server_ns, SERVER_IP, 8080, work)
        yield Lab(server_ns, node_ns, server, work, script, applet_dir(work))
    finally:
        if server is not None:
            server.stop()
        if udhcpd is not None:
            udhcpd.stop()
        node_ns.delete()
        server_ns.delete()


def cpus_like_agent() -> int:
    return sum(1 for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("processor"))


def in_pool(ip: str | None) -> bool:
    return ip is not None and ip.startswith("10.231.0.") and 100 <= int(ip.rsplit(".", 1)[1]) <= 150


def test_register_heartbeat_and_obey(lab: Lab) -> None:
    mac = "52:54:00:a9:00:01"
    token = lab.server.enrollment_token()
    agent = lab.agent(
        "main", mac, f"qrm.server={lab.server.url} qrm.mac={mac} qrm.gen=0 qrm.enroll={token} qrm.mode=idle"
    )
    try:
        row = lab.server.wait_resource(mac, 30, "registration", lambda r: r.state == ResourceState.IDLE.value)
        assert in_pool(row.ip), row.ip
        assert row.cpus == cpus_like_agent() and row.memory_mb == memory_mb_like_agent()
        assert row.kind == "physical" and row.hostname == "node-7"  # from DHCP option 12
        first_seen = row.last_seen
        row = lab.server.wait_resource(
            mac, 15, "heartbeats", lambda r: r.load is not None and r.last_seen > first_seen
        )
        text = agent.wait_log("registered as resource", 5)
        assert f"dhcp: vn has {row.ip}/24 (router {SERVER_IP}" in text
        routes = run(IP, "-n", lab.node_ns.name, "route").stdout
        assert f"default via {SERVER_IP} dev vn" in routes

        # Another registration of the MAC while the agent is alive is refused (issue 15:
        # it used to replace the token and lock the real agent out); the agent carries on.
        with lab.server.ctx() as ctx, pytest.raises(agent_service.RegistrationRefused):
            agent_service.register(ctx, mac=mac, ip=None, cpus=1, memory_mb=1, source="10.0.0.99")
        seen = lab.server.resource(mac).last_seen
        lab.server.wait_resource(mac, 15, "heartbeats go on", lambda r: r.last_seen > seen)
        assert lab.server.resource(mac).cpus == cpus_like_agent()
        assert "registering again" not in agent.text()

        # halt, then reboot, ordered through qrm.
        with lab.server.ctx() as ctx:
            agent_service.order_halt(ctx, mac)
        agent.wait_log("halt did not happen", 15)
        assert (agent.run_dir / "halted").exists() and not (agent.run_dir / "rebooted").exists()
        assert lab.server.resource(mac).state == ResourceState.OFF.value
        with lab.server.ctx() as ctx:
            agent_service.order_reboot(ctx, mac)
        agent.wait_log("the server commands: reboot", 15)
        # The agent logs the command, then runs it: on a loaded machine the file comes a moment later.
        wait_until((agent.run_dir / "rebooted").exists, "the agent's reboot command", 15)
        assert agent.proc.poll() is None  # the agent never exits
    finally:
        agent.stop()


def test_wrong_enrollment_token_is_reported_and_retried(lab: Lab) -> None:
    mac = "52:54:00:a9:00:02"
    agent = lab.agent(
        "wrong-token",
        mac,
        f"qrm.server={lab.server.url} qrm.mac={mac} qrm.gen=0 qrm.enroll=not-the-token qrm.mode=idle",
    )
    try:
        agent.wait_log("refused (401): the enrollment token (qrm.enroll) is wrong", 20, count=2)
        assert lab.server.resource(mac) is None
    finally:
        agent.stop()


def test_unreachable_server_is_retried(lab: Lab) -> None:
    mac = "52:54:00:a9:00:03"
    agent = lab.agent("unreachable", mac, f"qrm.server=http://{SERVER_IP}:9 qrm.mac={mac} qrm.enroll=x")
    try:
        agent.wait_log("is not reachable", 20, count=2)
    finally:
        agent.stop()


def test_malformed_answers_are_never_obeyed(lab: Lab) -> None:
    """A peer that answers garbage: the agent logs each answer and carries on; only a
    well-formed command is obeyed."""
    peer = AgentPeer("peer-token", heartbeat_interval=1.0)
    peer.serve(lab.server_ns.listen(SERVER_IP, 8081))
    reboot = b'{"command": "reboot", "heartbeat_interval": 1.0, "boot_generation": 0}'
    peer.overrides["/agent/v1/register"] = [
        (200, b'{"resource_id": "1; reboot", "token": "t", "heartbeat_interval": 1.0}'),
    ]
    peer.overrides["/agent/v1/heartbeat"] = [
        (200, b"<html>reboot</html>"),
        (200, reboot[:-1]),
        (200, b'{"command": "none", "command": "reboot"}'),
        (200, b'{"command": "reboot now"}'),
        (200, b'{"command": 1}'),
        (200, b'{"command": "reboot\\n"}'),
        (200, b'["reboot"]'),
        (500, reboot),
        (200, b'{"command": "halt", "heartbeat_interval": 1.0, "boot_generation": 0}'),
    ]
    mac = "52:54:00:a9:00:04"
    agent = lab.agent(
        "malformed",
        mac,
        f"qrm.server=http://{SERVER_IP}:8081 qrm.mac={mac} qrm.gen=0 qrm.enroll=peer-token qrm.mode=idle",
    )
    try:
        text = agent.wait_log("halt did not happen", 40)
        assert not (agent.run_dir / "rebooted").exists()
        assert (agent.run_dir / "halted").exists()
        assert text.count("malformed answer from the server") == 8, text  # 1 register + 7 heartbeats
        assert "register: malformed answer from the server (resource_id" in text
        assert "heartbeat: the server answered HTTP 500" in text
        # What the agent sent follows the protocol (the peer checks types and fields strictly).
        registers = [r for r in peer.requests if r.path == "/agent/v1/register"]
        assert registers[0].status == 200 and registers[0].body["mac"] == mac
        assert registers[0].body["mode"] == "idle" and registers[0].body["ve"] is None
        beats = [r for r in peer.requests if r.path == "/agent/v1/heartbeat"]
        assert all(r.status == 200 for r in beats), [(r.status, r.body) for r in beats]
        assert {r.body["state"] for r in beats} == {"idle"}
        assert all(isinstance(r.body["load"], float | int) for r in beats)
    finally:
        agent.stop()
        peer.stop()
