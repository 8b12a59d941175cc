"""The NFS test lab: a real nfs-ganesha in a network namespace, clients in two others.

Topology (every address lives inside namespaces this file creates; the root
namespace gets no address and no interface)::

    client1 ns  c1 10.213.1.2/24 ── s1 10.213.1.1/24 ┐
                                                     server ns: rpcbind + ganesha.nfsd
    client2 ns  c2 10.213.2.2/24 ── s2 10.213.2.1/24 ┘

ganesha and rpcbind are started by the plugin's own GaneshaService (with
``netns`` and ``run_rpcbind``), tracked by PID and stopped by PID; the
namespaces are deleted in a ``finally``. Clients are libnfs-utils
(``nfs-ls``, ``nfs-cp``, ``nfs-cat``) and ``showmount``: this machine's
kernel has no NFS client, so userspace clients are the real thing here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qrm_core.config import Settings
from qrm_core.drivers.base import StorageTarget
from qrm_core.testkit import Netns
from qrm_nfs.driver import NfsStorage
from qrm_nfs.service import GaneshaService
from qrm_nfs.settings import NfsSettings

SERVER_IP1, CLIENT_IP1 = "10.213.1.1", "10.213.1.2"
SERVER_IP2, CLIENT_IP2 = "10.213.2.1", "10.213.2.2"
TOOLS = {
    "ip": "iproute2",
    "unshare": "util-linux",
    "ganesha.nfsd": "nfs-ganesha nfs-ganesha-vfs",
    "rpcbind": "rpcbind",
    "rpcinfo": "rpcbind",
    "nfs-ls": "libnfs-utils",
    "nfs-cp": "libnfs-utils",
    "nfs-cat": "libnfs-utils",
    "showmount": "nfs-common",
}


def require_lab_tools() -> None:
    """Root and the real NFS components, or skip (fail under CI=true)."""
    from qrm_core.testing import missing  # imported late: pytest registers it as a plugin first

    if os.geteuid() != 0:
        missing("root", "the NFS tests create network namespaces and run nfs-ganesha; run them as root")
    absent = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if absent:
        missing("NFS test components", f"apt-get install {' '.join(absent)}")
    if not NfsStorage(Settings()).detect_missing_dependencies() == []:
        missing("nfs-ganesha VFS backend", "apt-get install nfs-ganesha-vfs")


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class Lab:
    server_ns: str
    client1_ns: str
    client2_ns: str
    root: Path
    config: Path
    nfs: NfsSettings
    core: Settings
    service: GaneshaService
    work: Path

    @property
    def driver(self) -> NfsStorage:
        return NfsStorage(self.core, self.nfs)

    @property
    def storage(self) -> StorageTarget:
        return StorageTarget(name="NFS", type="nfs", address=SERVER_IP1, comment="QRMSRC")

    def client(self, which: int, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        ns = self.client1_ns if which == 1 else self.client2_ns
        return sh("ip", "netns", "exec", ns, *args, check=False, timeout=timeout)

    def url(self, which: int, path: str) -> str:
        return f"nfs://{SERVER_IP1 if which == 1 else SERVER_IP2}{path}"

    def in_server(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.server_ns, *args, check=False)


def make_namespaces() -> list[Netns]:
    """The server's namespace and the two clients', joined by veth pairs (server first)."""
    made: list[Netns] = []
    try:
        server = Netns("nfss")
        made.append(server)
        for s_if, c_if, tag, s_ip, c_ip in (
            ("s1", "c1", "nfc1", SERVER_IP1, CLIENT_IP1),
            ("s2", "c2", "nfc2", SERVER_IP2, CLIENT_IP2),
        ):
            client = Netns(tag)
            made.append(client)
            # veth pairs are created directly inside the namespaces: the root
            # namespace never holds one of these interfaces, even for a moment.
            server.ip("link", "add", s_if, "type", "veth", "peer", "name", c_if, "netns", client.name)
            server.ip("addr", "add", f"{s_ip}/24", "dev", s_if)
            client.ip("addr", "add", f"{c_ip}/24", "dev", c_if)
            server.ip("link", "set", s_if, "up")
            client.ip("link", "set", c_if, "up")
    except Exception:
        for ns in made:
            ns.delete()
        raise
    return made
