"""The conformance kit (qrm_core.conformance) against the real tgtd of the test's storage
host, reached over SSH: what every storage driver must do, and every optional operation
this one claims (list_volumes, capacity)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import IscsiLab

from qrm_core.conformance import StorageContract
from qrm_core.plugin_api import ExportClient, RunResult, StorageTarget
from qrm_iscsi.driver import IscsiStorage


class InLab(IscsiStorage):
    """The real driver; its scripts run from the storage host's network (its address is
    only there), as the qrm server's would from the provisioning network."""

    lab: IscsiLab

    def _run(self, storage: StorageTarget, script: str, **kwargs: Any) -> RunResult:
        return self.lab.on(lambda: super(InLab, self)._run(storage, script, **kwargs))


class TestIscsiConformance(StorageContract):
    #: Big enough that a new LUN shows in the free space, whatever else the machine does meanwhile.
    size_mb = 256

    @pytest.fixture
    def driver(self, lab: IscsiLab) -> IscsiStorage:
        driver = InLab(lab.core, lab.iscsi)
        driver.lab = lab
        return driver

    @pytest.fixture
    def storage(self, lab: IscsiLab) -> StorageTarget:
        return lab.storage()

    @pytest.fixture
    def client(self) -> ExportClient:
        return ExportClient(
            mac="52:54:00:00:00:0d", ip="10.231.11.60", initiator="iqn.2026-12.org.qrm:52540000000d"
        )
