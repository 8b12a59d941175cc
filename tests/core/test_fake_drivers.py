"""The fake drivers core ships behave like backends: state, capacity, errors."""

import pytest

from qrm_core.config import Settings
from qrm_core.drivers.base import (
    ExportClient,
    HostTarget,
    PartitionSpec,
    StorageTarget,
    format_pinning,
    parse_pinning,
)
from qrm_core.drivers.fake import FakeHypervisor, FakeStorage
from qrm_core.errors import DriverError, InvalidInput, NotFound


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path)


HOST = HostTarget(
    resource_id=1, mac="52:54:00:00:00:01", address="10.0.0.1", hostname="h1", cpus=4, memory_mb=1024
)
HOST2 = HostTarget(
    resource_id=2, mac="52:54:00:00:00:02", address="10.0.0.2", hostname="h2", cpus=2, memory_mb=512
)


def test_partition_life_cycle_and_capacity(settings: Settings) -> None:
    hv = FakeHypervisor(settings)
    info = hv.create_partition(HOST, PartitionSpec(name="vm1", cpus=2, memory_mb=600, max_cpus=3))
    assert info.state == "stopped" and info.mac.startswith("52:54:00:")
    hv.create_partition(HOST, PartitionSpec(name="vm2", cpus=1, memory_mb=600, mac="52:54:00:aa:bb:cc"))
    hv.start_partition(HOST, "vm1")
    with pytest.raises(DriverError, match="not enough memory"):
        hv.start_partition(HOST, "vm2")
    assert hv.host_info(HOST).free_memory_mb == 1024 - 600
    hv.pause_partition(HOST, "vm1")
    with pytest.raises(DriverError):
        hv.pause_partition(HOST, "vm1")
    with pytest.raises(DriverError):
        hv.stop_partition(HOST, "vm1")
    hv.unpause_partition(HOST, "vm1")
    with pytest.raises(DriverError, match="at most 3 CPUs while running"):
        hv.set_vcpus(HOST, "vm1", 4)  # above the maximum set at creation
    hv.set_vcpus(HOST, "vm1", 3)
    hv.pin_vcpus(HOST, "vm1", {0: (0, 1), 2: (3,)})
    assert hv.get_partition(HOST, "vm1").cpu_pinning == {0: (0, 1), 2: (3,)}
    with pytest.raises(InvalidInput):
        hv.pin_vcpus(HOST, "vm1", {5: (0,)})
    with pytest.raises(DriverError):
        hv.set_memory(HOST, "vm1", 2000)
    # A persistent change alone takes effect at the next start.
    hv.set_memory(HOST, "vm1", 400, live=False)
    assert hv.get_partition(HOST, "vm1").memory_mb == 600
    hv.stop_partition(HOST, "vm1")
    assert hv.get_partition(HOST, "vm1").memory_mb == 400
    hv.start_partition(HOST, "vm1")
    assert hv.get_partition(HOST, "vm1").memory_mb == 400
    # A second driver instance (another process) sees the same state.
    assert [p.name for p in FakeHypervisor(settings).list_partitions(HOST)] == ["vm1", "vm2"]
    hv.stop_partition(HOST, "vm1")
    hv.destroy_partition(HOST, "vm1")
    with pytest.raises(NotFound):
        hv.get_partition(HOST, "vm1")


def test_migration_needs_room_and_moves_the_partition(settings: Settings) -> None:
    hv = FakeHypervisor(settings)
    hv.create_partition(HOST, PartitionSpec(name="big", cpus=1, memory_mb=800))
    hv.start_partition(HOST, "big")
    with pytest.raises(DriverError, match="memory"):
        hv.migrate_partition(HOST, "big", HOST2)
    hv.set_memory(HOST, "big", 256)
    hv.pin_vcpus(HOST, "big", {0: (3,)})
    hv.migrate_partition(HOST, "big", HOST2)
    assert hv.get_partition(HOST2, "big").cpu_pinning == {}  # pinning names the source's CPUs
    assert hv.list_partitions(HOST) == []
    assert hv.get_partition(HOST2, "big").state == "running"
    with pytest.raises(InvalidInput):
        hv.migrate_partition(HOST2, "big", HOST2)


def test_storage_volumes_and_exports(settings: Settings) -> None:
    st = FakeStorage(settings)
    target = StorageTarget(name="s1", type="fake", address="10.0.0.9")
    st.validate_server(target)
    with pytest.raises(InvalidInput):
        st.validate_server(StorageTarget(name="s1", type="fake", address="nowhere"))
    vol = st.create_volume(target, "web", 100)
    with pytest.raises(DriverError):
        st.create_volume(target, "web", 100)
    client = ExportClient(mac="52:54:00:00:00:01", ip="10.0.0.50")
    st.export_volume(target, vol.location, client)
    st.export_volume(target, vol.location, client)
    assert st.list_volumes(target)[0].exported_to == ("10.0.0.50",)
    with pytest.raises(DriverError, match="exported"):
        st.remove_volume(target, vol.location)
    st.unexport_volume(target, vol.location, client)
    st.remove_volume(target, vol.location)
    with pytest.raises(NotFound):
        st.remove_volume(target, vol.location)
    for bad in ("relative", "/a/../b", "/a b", "/a;b"):
        with pytest.raises(InvalidInput):
            st.validate_location(target, bad)
    assert st.describe_root(target, "/x").kernel_args == ("qrm.root=fake:10.0.0.9:/x",)


def test_pinning_syntax() -> None:
    assert parse_pinning("0:0-1;1:3", vcpus=2, host_cpus=4) == {0: (0, 1), 1: (3,)}
    assert format_pinning({0: (0, 1), 1: (3,)}) == "0:0,1;1:3"
    for bad in ("0", "x:1", "2:0", "0:9", "0:3-1", "0:a"):
        with pytest.raises(ValueError):
            parse_pinning(bad, vcpus=2, host_cpus=4)
