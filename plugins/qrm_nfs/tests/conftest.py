"""Fixtures for the NFS tests; the lab itself is described in nfslab.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nfslab import Lab, make_namespaces, require_lab_tools

from qrm_core.config import Settings
from qrm_nfs.service import GaneshaService
from qrm_nfs.settings import NfsSettings

pytest_plugins = ["qrm_core.testing"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_lab_tools()
    work = tmp_path_factory.mktemp("nfslab")
    # ganesha's VFS backend needs a filesystem with file handles; the
    # pytest temporary directory is one (ext4/xfs/tmpfs all are).
    root = work / "exports"
    root.mkdir()
    (work / "ganesha").mkdir()
    core = Settings(data_dir=work / "data")
    nfs = NfsSettings(
        export_root=root,
        ganesha_config=work / "ganesha" / "exports.conf",
        run_ganesha=True,
        run_rpcbind=True,
        netns=None,
        state_dir=work / "state",
        reload_timeout=15,
    )
    rpcbind_files = {p: p.exists() for p in (Path("/run/rpcbind.sock"), Path("/run/rpcbind.lock"))}
    namespaces = make_namespaces()
    server, c1, c2 = (ns.name for ns in namespaces)
    nfs = nfs.model_copy(update={"netns": server})
    service = GaneshaService(core, nfs)
    try:
        service.start()
        yield Lab(server, c1, c2, root, nfs.ganesha_config, nfs, core, service, work)  # type: ignore[arg-type]
    finally:
        service.stop()
        for ns in reversed(namespaces):
            ns.delete()
    # The lab's rpcbind ran with a private /run: nothing global was left behind.
    assert {p: p.exists() for p in rpcbind_files} == rpcbind_files
