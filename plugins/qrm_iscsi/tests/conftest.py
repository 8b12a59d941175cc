"""Fixtures for the iSCSI tests: a storage host (its own network namespace and /run)
running a real tgtd and sshd; the driver reaches it over SSH with a throwaway key, as
qrm reaches a remote storage server, and libiscsi's tools log in from the host.

Needs root, tgt, openssh-server, libiscsi-bin and e2fsprogs (Debian); missing pieces skip
(fail under CI=true) with what to install.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qrm_core.plugin_api import Settings, StorageTarget
from qrm_iscsi.driver import IscsiStorage
from qrm_iscsi.settings import IscsiSettings

pytest_plugins = ["qrm_core.testing"]
ADDRESS = "10.231.11.35"
T = TypeVar("T")


@dataclass
class IscsiLab:
    host: Any  # qrm_core.testkit.StorageHost
    core: Settings
    iscsi: IscsiSettings
    backing: Path
    known_host: str
    user_key: Path

    @property
    def driver(self) -> IscsiStorage:
        return IscsiStorage(self.core, self.iscsi)

    def storage(self, **settings: str) -> StorageTarget:
        return StorageTarget(
            name="st", type="iscsi", address=ADDRESS, comment="", settings={"ssh_user": "root", **settings}
        )

    def on(self, work: Callable[[], T]) -> T:
        """Run ``work`` (driver calls: ssh to the host) in the storage host's network."""
        return self.host.netns.inside(work)

    def tgt_show(self) -> str:
        return self.host.tgtadm("--op", "show", "--mode", "target").stdout

    def client(self, *args: str) -> Any:
        """A libiscsi tool run in the storage host's network (the host's loopback has the portal)."""
        import subprocess

        return subprocess.run(
            ["ip", "netns", "exec", self.host.netns.name, *args], capture_output=True, text=True, timeout=60
        )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IscsiLab]:
    from qrm_core.testing import missing
    from qrm_core.testkit import StorageHost, missing_storage_tools

    if os.geteuid() != 0:
        missing("root", "the iSCSI tests create network namespaces and run tgtd")
    absent = missing_storage_tools("nsenter", "unshare", "tgtd", "tgtadm", "sshd", "ssh", "ssh-keygen")
    for program, package in (("iscsi-inq", "libiscsi-bin"), ("mkfs.ext4", "e2fsprogs")):
        if not any(Path(d, program).exists() for d in ("/usr/bin", "/usr/sbin", "/sbin")):
            absent.append(package)
    if absent:
        missing("iSCSI test components", f"apt-get install {' '.join(sorted(set(absent)))}")
    work = tmp_path_factory.mktemp("iscsi")
    backing = work / "luns"
    backing.mkdir()
    host = StorageHost("isc", work / "host", ADDRESS)
    try:
        host.start_tgtd()
        user_key, known = host.start_sshd()
        core = Settings(data_dir=work / "qrm")
        from qrm_core.remote import install_key, pin_host_key

        install_key(core.data_dir, "st", user_key.read_text())
        pin_host_key(core.data_dir, "st", ADDRESS, 22, known)
        iscsi = IscsiSettings(backing_dir=str(backing), tgt_control_port=17, state_dir=str(work / "state"))
        yield IscsiLab(host, core, iscsi, backing, known, user_key)
    finally:
        host.stop()
