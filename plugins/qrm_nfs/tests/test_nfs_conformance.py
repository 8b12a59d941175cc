"""The conformance kit (qrm_core.conformance) against the lab's real nfs-ganesha."""

from __future__ import annotations

import pytest
from nfslab import CLIENT_IP1, Lab

from qrm_core.conformance import StorageContract
from qrm_core.drivers.base import ExportClient, StorageTarget
from qrm_nfs.driver import NfsStorage

pytestmark = pytest.mark.netns


class TestNfsConformance(StorageContract):
    @pytest.fixture
    def driver(self, lab: Lab) -> NfsStorage:
        return lab.driver

    @pytest.fixture
    def storage(self, lab: Lab) -> StorageTarget:
        return lab.storage

    @pytest.fixture
    def client(self) -> ExportClient:
        return ExportClient(mac="52:54:00:00:00:01", ip=CLIENT_IP1)
