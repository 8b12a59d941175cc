"""The conformance kit (qrm_core.conformance) run against the fake drivers core
ships, and shown to catch drivers that break their interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrm_core.config import Settings
from qrm_core.conformance import HypervisorContract, PowerContract, StorageContract
from qrm_core.drivers.base import (
    ExportClient,
    HostInfo,
    HostTarget,
    HypervisorDriver,
    PartitionInfo,
    PartitionSpec,
    PowerTarget,
    StorageTarget,
)
from qrm_core.drivers.fake import FakeHypervisor, FakePower, FakeStorage
from qrm_core.errors import UnsupportedOperation


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def host_target(n: int) -> HostTarget:
    return HostTarget(
        resource_id=n, mac=f"52:54:00:00:00:0{n}", address=None, hostname=f"hv{n}", cpus=4, memory_mb=4096
    )


class TestFakeHypervisor(HypervisorContract):
    @pytest.fixture
    def driver(self, settings: Settings) -> HypervisorDriver:
        return FakeHypervisor(settings)

    @pytest.fixture
    def host(self) -> HostTarget:
        return host_target(1)

    @pytest.fixture
    def other_host(self) -> HostTarget:
        return host_target(2)


class TestFakeStorage(StorageContract):
    @pytest.fixture
    def driver(self, settings: Settings) -> FakeStorage:
        return FakeStorage(settings)

    @pytest.fixture
    def storage(self) -> StorageTarget:
        return StorageTarget(name="demo", type="fake", address="10.0.0.2")

    @pytest.fixture
    def client(self) -> ExportClient:
        return ExportClient(
            mac="52:54:00:00:00:09",
            ip="10.0.0.9",
            hostname="m9",
            initiator="iqn.2026-12.org.qrm:525400000009",
        )


class TestFakePower(PowerContract):
    @pytest.fixture
    def driver(self, settings: Settings) -> FakePower:
        return FakePower(settings)

    @pytest.fixture
    def target(self) -> PowerTarget:
        return PowerTarget(
            resource_id=7, mac="52:54:00:00:00:07", address="bmc7", username="admin", password="s3cret"
        )


class Minimal(HypervisorDriver):
    """A hypervisor with the required operations only (delegated to the fake)."""

    name = "minimal"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.fake = FakeHypervisor(settings)

    def validate_host(self, host: HostTarget) -> None:
        self.fake.validate_host(host)

    def host_info(self, host: HostTarget) -> HostInfo:
        return self.fake.host_info(host)

    def list_partitions(self, host: HostTarget) -> list[PartitionInfo]:
        return self.fake.list_partitions(host)

    def get_partition(self, host: HostTarget, name: str) -> PartitionInfo:
        return self.fake.get_partition(host, name)

    def create_partition(self, host: HostTarget, spec: PartitionSpec) -> PartitionInfo:
        return self.fake.create_partition(host, spec)

    def start_partition(self, host: HostTarget, name: str) -> None:
        self.fake.start_partition(host, name)

    def stop_partition(self, host: HostTarget, name: str, force: bool = False) -> None:
        self.fake.stop_partition(host, name, force)

    def destroy_partition(self, host: HostTarget, name: str) -> None:
        self.fake.destroy_partition(host, name)


class TestMinimalHypervisor(HypervisorContract):
    """A driver without optional operations passes too: every one is refused."""

    @pytest.fixture
    def driver(self, settings: Settings) -> HypervisorDriver:
        return Minimal(settings)

    @pytest.fixture
    def host(self) -> HostTarget:
        return host_target(3)


def test_supported_operations_are_the_overridden_ones(settings: Settings) -> None:
    assert Minimal(settings).supported_operations() == frozenset()
    assert FakeHypervisor(settings).supported_operations() == frozenset(HypervisorDriver.OPTIONAL_OPERATIONS)
    with pytest.raises(UnsupportedOperation, match=r"^minimal on hv3 cannot pin CPUs$"):
        Minimal(settings).pin_vcpus(host_target(3), "x", {0: (1,)})


class Liar(Minimal):
    """Claims pausing, and cannot."""

    name = "liar"

    def supported_operations(self, target: object | None = None) -> frozenset[str]:
        return frozenset({"pause_partition", "unpause_partition"})


class Careless(FakeHypervisor):
    """Accepts any partition name, so a name reaches its configuration unchecked."""

    name = "careless"

    def validate_partition(self, host: HostTarget, spec: PartitionSpec) -> None:
        pass

    def create_partition(self, host: HostTarget, spec: PartitionSpec) -> PartitionInfo:
        return PartitionInfo(name=spec.name, state="stopped", cpus=1, memory_mb=1, mac="52:54:00:00:00:01")


def test_the_kit_catches_a_driver_that_lies_about_what_it_supports(settings: Settings) -> None:
    made: list[tuple[HostTarget, str]] = []
    with pytest.raises(UnsupportedOperation):
        HypervisorContract().test_pause_and_resume(Liar(settings), host_target(4), made)


def test_the_kit_catches_a_driver_that_lets_hostile_names_through(settings: Settings) -> None:
    with pytest.raises(pytest.fail.Exception):
        HypervisorContract().test_hostile_partition_names_are_refused(
            Careless(settings), host_target(5), "semi;colon"
        )
