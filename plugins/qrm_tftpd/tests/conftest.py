"""Fixtures: a real TFTP server on a loopback port, run in a thread and stopped by the test."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qrm_core.services.boot import BootConfig
from qrm_tftpd.content import ContentResolver
from qrm_tftpd.server import Content, TftpServer

pytest_plugins = ["qrm_core.testing"]

IPXE_DIR = Path("/usr/lib/ipxe")
PXELINUX_DIR = Path("/usr/lib/PXELINUX")
SYSLINUX_DIR = Path("/usr/lib/syslinux/modules/bios")


def need_tool(name: str, package: str) -> str:
    from qrm_core.testing import missing

    path = shutil.which(name)
    if path is None:
        missing(name, f"install the Debian package {package}")
    assert path is not None
    return path


def need_file(path: Path, package: str) -> Path:
    from qrm_core.testing import missing

    if not path.is_file():
        missing(str(path), f"install the Debian package {package}")
    return path


class NoBootConfigs:
    """A boot source for tests that are about files, not boot configurations."""

    def boot_config(self, mac: str) -> BootConfig:
        raise AssertionError("this test should not ask for a boot configuration")

    def boot_file(self, image: str, which: str) -> Content | None:
        return None

    def describe(self) -> str:
        return "none"

    def check(self) -> None:
        pass


@pytest.fixture
def tftp_root(tmp_path: Path) -> Path:
    root = tmp_path / "tftpboot"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello\nworld\r\n")
    (root / "sub").mkdir()
    (root / "sub" / "file.bin").write_bytes(os.urandom(5000))
    return root


def make_resolver(root: Path, source: Any = None, **kwargs: Any) -> ContentResolver:
    return ContentResolver(
        source or NoBootConfigs(),
        root=root,
        ipxe_dir=IPXE_DIR,
        pxelinux_dir=PXELINUX_DIR,
        syslinux_modules_dir=SYSLINUX_DIR,
        **kwargs,
    )


@pytest.fixture
def serve() -> Iterator[Callable[..., TftpServer]]:
    """``serve(resolver, **options)`` starts a server on 127.0.0.1 (free port) in a thread."""
    started: list[tuple[TftpServer, threading.Thread]] = []

    def start(resolver: Any, **options: Any) -> TftpServer:
        options.setdefault("timeout", 0.5)
        options.setdefault("retries", 3)
        server = TftpServer(resolver, address="127.0.0.1", port=0, **options)
        server.bind()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    try:
        yield start
    finally:
        for server, thread in started:
            server.stop()
            thread.join(10)
            assert not thread.is_alive(), "the server thread did not stop"


@contextlib.contextmanager
def network_namespace(tag: str, steps: list[list[str]]) -> Iterator[str]:
    """A network namespace of this test run (``ip -n NS <step>`` for each step); always deleted."""
    from qrm_core.testing import missing

    if os.geteuid() != 0:
        missing("root", "network-namespace tests need root")
    need_tool("ip", "iproute2")
    from qrm_core.testkit import Netns

    netns = Netns(f"t{tag}"[:5])
    try:
        for step in steps:
            netns.ip(*step)
        yield netns.name
    finally:
        netns.delete()
