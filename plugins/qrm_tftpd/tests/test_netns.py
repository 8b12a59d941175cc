"""Behaviour that needs addresses of its own: inside a network namespace this test creates."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import network_namespace

pytestmark = pytest.mark.netns

PROBE = """
import socket, threading
from qrm_tftpd.server import Content, TftpServer

server = TftpServer(lambda r: Content.of_bytes(r.local_address.encode(), "test"), address="0.0.0.0", port=0)
server.bind()
thread = threading.Thread(target=server.serve_forever, daemon=True)
thread.start()
for address in ("10.231.1.1", "10.231.1.2"):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("10.231.1.1", 0))
        client.settimeout(5)
        client.sendto(b"\\0\\1x\\0octet\\0", (address, server.port))
        data, source = client.recvfrom(1024)
        print(address, source[0], data[4:].decode())
server.stop()
thread.join(10)
"""


def test_a_wildcard_listener_answers_from_the_address_asked() -> None:
    # Two addresses on one interface: without IP_PKTINFO the answer to a request
    # sent to .2 would come from .1 (the route's source), and a PXE client drops it.
    steps = [
        ["link", "add", "br0", "type", "bridge"],
        ["addr", "add", "10.231.1.1/24", "dev", "br0"],
        ["addr", "add", "10.231.1.2/24", "dev", "br0"],
        ["link", "set", "br0", "up"],
    ]
    with network_namespace("pktinfo", steps) as netns:
        result = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "10.231.1.1 10.231.1.1 10.231.1.1",
        "10.231.1.2 10.231.1.2 10.231.1.2",
    ]
