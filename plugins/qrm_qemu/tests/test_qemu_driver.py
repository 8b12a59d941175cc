"""The qemu driver on libvirt's test driver: core's conformance kit, the domain it
defines (valid for libvirt's schema, network boot first, the domain type per host) and
bad input. The real-QEMU tests are in test_real_qemu.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qrm_core.conformance import HypervisorContract
from qrm_core.plugin_api import HostTarget, InvalidInput, PartitionSpec
from qrm_libvirt.testing import DefinitionMover, assert_valid_domain, test_host
from qrm_qemu.driver import QemuHypervisor, detect_domain_type


@pytest.fixture
def driver(libvirt, settings) -> QemuHypervisor:
    return QemuHypervisor(settings)


@pytest.fixture
def host(tmp_path: Path) -> HostTarget:
    return test_host(tmp_path / "hosts", "hv1", resource_id=1, cpus=4, memory_mb=8192)


class TestQemuOnTheTestDriver(HypervisorContract):
    """Core's conformance kit on libvirt's test driver; test_migration runs through the
    DefinitionMover seam (the test driver has no migration)."""

    @pytest.fixture
    def driver(self, libvirt, settings) -> QemuHypervisor:
        made = QemuHypervisor(settings)
        made.migrator = DefinitionMover()
        return made

    @pytest.fixture
    def other_host(self, tmp_path: Path) -> HostTarget:
        return test_host(tmp_path / "hosts", "hv2", resource_id=2, cpus=4, memory_mb=8192)


def domain_xml(driver, host, name: str) -> str:
    conn = driver.pool().get(host.uri, host.label)
    return conn.lookupByName(name).XMLDesc(0)


def test_a_partition_is_a_pc_that_boots_from_its_nic(driver, host) -> None:
    driver.create_partition(
        host,
        PartitionSpec("p1", cpus=1, memory_mb=128, mac="52:54:00:00:aa:01", max_cpus=4, max_memory_mb=512),
    )
    xml = domain_xml(driver, host, "p1")
    assert_valid_domain(xml)
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"  # the test host offers no kvm
    nic = root.find("devices/interface")
    assert nic.get("type") == "bridge" and nic.find("source").get("bridge") == "br0"
    assert nic.find("boot").get("order") == "1" and nic.find("model").get("type") == "virtio"
    assert nic.find("mac").get("address") == "52:54:00:00:aa:01"
    assert root.find("vcpu").text == "4" and root.find("vcpu").get("current") == "1"
    assert root.find("devices/memballoon").get("model") == "virtio"
    assert root.find("cpu") is None


def test_host_settings_choose_type_nic_and_bridge(driver, tmp_path) -> None:
    host = test_host(
        tmp_path / "hosts",
        "hv3",
        resource_id=3,
        network="prov0",
        settings={"domain_type": "kvm", "nic_model": "e1000", "console_log_dir": "/var/log/qrm"},
    )
    driver.create_partition(host, PartitionSpec("p1", cpus=1, memory_mb=64))
    root = ET.fromstring(domain_xml(driver, host, "p1"))
    assert root.get("type") == "kvm"
    assert root.find("devices/interface/source").get("bridge") == "prov0"
    assert root.find("devices/interface/model").get("type") == "e1000"
    assert root.find("devices/serial/log").get("file") == "/var/log/qrm/p1.log"
    assert root.find("devices/interface/mac").get("address").startswith("52:54:00:")


CAPS = """<capabilities><host><cpu><arch>x86_64</arch>{features}</cpu></host>
<guest><os_type>hvm</os_type><arch name='x86_64'>{domains}</arch></guest></capabilities>"""


@pytest.mark.parametrize(
    ("features", "domains", "expected"),
    [
        ("<feature name='vmx'/>", "<domain type='qemu'/><domain type='kvm'/>", "kvm"),
        ("<feature name='svm'/>", "<domain type='qemu'/><domain type='kvm'/>", "kvm"),
        ("<feature name='hypervisor'/>", "<domain type='qemu'/><domain type='kvm'/>", "qemu"),
        ("<feature name='vmx'/>", "<domain type='qemu'/>", "qemu"),
    ],
)
def test_kvm_where_the_host_can_virtualise(features, domains, expected) -> None:
    """/dev/kvm alone is not enough: a host whose CPU lacks VT-x/AMD-V (a paravirtual KVM
    in a VM, as on qrm's test machines) hangs real guests under kvm; those run TCG."""
    assert detect_domain_type(CAPS.format(features=features, domains=domains)) == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"domain_type": "xen"}, "use kvm, qemu or auto"),
        ({"nic_model": "ne2k_pci"}, "use virtio"),
        ({"machine": "pc; rm -rf /"}, "not a QEMU machine type"),
        ({"console_log_dir": "relative/dir"}, "absolute path"),
        ({"migration_address": "10.0.0.1 -p 22"}, "not an address"),
        ({"xen_mode": "pv"}, "unknown qemu host setting"),
    ],
)
def test_bad_host_settings_are_one_line(driver, host, settings, message) -> None:
    bad = HostTarget(**{**host.__dict__, "settings": settings})
    with pytest.raises(InvalidInput) as info:
        driver.create_partition(bad, PartitionSpec("p1", cpus=1, memory_mb=64))
    assert message in info.value.message and "\n" not in info.value.message
    assert driver.list_partitions(host) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"network": "br0; reboot"}, "is not a bridge name"),
        ({"network": "a-bridge-name-too-long"}, "is not a bridge name"),
        ({"memory_mb": 8}, "at least 16 MB"),
        ({"cpus": 1, "max_cpus": 300}, "at most 255"),
        ({"mac": "01:00:5e:00:00:01"}, "not a unicast MAC"),
    ],
)
def test_bad_partitions_are_one_line(driver, host, change, message) -> None:
    values = dict(name="p1", cpus=1, memory_mb=64)
    values.update(change)
    with pytest.raises(InvalidInput) as info:
        driver.create_partition(host, PartitionSpec(**values))
    assert message in info.value.message
    assert driver.list_partitions(host) == []


def test_the_default_uri_is_qemu_over_ssh(driver, host) -> None:
    assert driver.uri(HostTarget(**{**host.__dict__, "uri": None})) == "qemu+ssh://root@192.0.2.10/system"


def test_a_xen_host_is_not_a_qemu_host(driver, host, tmp_path) -> None:
    driver.create_partition(host, PartitionSpec("p1", cpus=1, memory_mb=64))
    xen = HostTarget(
        **{**host.__dict__, "resource_id": 9, "hostname": "xen9", "uri": "xen+ssh://root@10.0.0.9/system"}
    )
    driver.migrator = DefinitionMover()
    with pytest.raises(InvalidInput) as info:
        driver.migrate_partition(host, "p1", xen)
    assert "is not a qemu URI" in info.value.message
    assert [p.name for p in driver.list_partitions(host)] == ["p1"]


def test_the_inventory_is_one_sweep(driver, host, libvirt) -> None:
    """list_partitions reads every domain's XML once; later sweeps are one listing call
    (getAllDomainStats where the backend reports sizes there; the test driver, which
    reports only states, is listed with listAllDomains and its in-process info())."""
    for i in range(5):
        driver.create_partition(host, PartitionSpec(f"p{i}", cpus=1, memory_mb=64))
    driver.list_partitions(host)
    calls: list[str] = []
    patched = {
        (libvirt.virConnect, "getAllDomainStats"),
        (libvirt.virConnect, "listAllDomains"),
        (libvirt.virConnect, "lookupByName"),
        (libvirt.virDomain, "XMLDesc"),
    }
    originals = {(cls, name): getattr(cls, name) for cls, name in patched}

    def counting(name, original):
        return lambda self, *a, **k: calls.append(name) or original(self, *a, **k)

    for (cls, name), original in originals.items():
        setattr(cls, name, counting(name, original))
    try:
        assert sorted(p.name for p in driver.list_partitions(host)) == [f"p{i}" for i in range(5)]
    finally:
        for (cls, name), original in originals.items():
            setattr(cls, name, original)
    assert calls == ["listAllDomains"]


def test_plugins_list_names_what_is_missing_in_one_line(qrm_cli, qrm_settings, monkeypatch, tmp_path) -> None:
    """``qrm plugins list``: the driver is enabled; without libvirt-python it says so in one
    line. A host that cannot be reached is the host's problem, not the plugin's: the operation
    fails naming the host, and the plugin stays enabled."""
    import sys

    from qrm_libvirt import binding
    from qrm_libvirt.errors import HostUnreachable

    assert qrm_cli("init").exit_code == 0

    def driver_record():
        listing = qrm_cli("plugins", "list", "-o", "json").json()
        return {(p["kind"], p["name"]): p for p in listing}

    records = driver_record()
    assert records[("plugin", "qemu")]["status"] == "enabled"
    assert (records[("hypervisor", "qemu")]["status"], records[("hypervisor", "qemu")]["missing"]) == (
        "enabled",
        [],
    )
    unreachable = HostTarget(
        resource_id=42,
        mac="52:54:00:00:00:42",
        address=None,
        hostname="hv42",
        cpus=1,
        memory_mb=1,
        uri=f"qemu+unix:///system?socket={tmp_path}/none/libvirt-sock",
    )
    with pytest.raises(HostUnreachable) as caught:
        QemuHypervisor(qrm_cli.settings if hasattr(qrm_cli, "settings") else None).list_partitions(
            unreachable
        )
    assert caught.value.message == (
        f"cannot reach host hv42 (qemu+unix:///system?socket={tmp_path}/none/libvirt-sock): "
        f"Failed to connect socket to '{tmp_path}/none/libvirt-sock': No such file or directory"
    )
    after = driver_record()[("hypervisor", "qemu")]
    assert (after["status"], after["missing"]) == ("enabled", [])
    monkeypatch.setattr(binding, "_module", None)
    monkeypatch.setitem(sys.modules, "libvirt", None)
    record = driver_record()[("hypervisor", "qemu")]
    assert record["status"] == "missing dependencies"
    assert len(record["missing"]) == 1 and record["missing"][0].startswith(
        "libvirt-python missing (pip install"
    )
    shown = qrm_cli("plugins", "list")
    assert "libvirt-python missing" in shown.stdout


def test_a_live_move_carries_the_migration_settings(libvirt, settings, host, tmp_path, monkeypatch) -> None:
    """QRM_QEMU_MIGRATION_* reach the migrator; unset, the move is libvirt's plain live one."""
    other = test_host(tmp_path / "hosts", "hv2", resource_id=2, cpus=4, memory_mb=8192)
    plain = QemuHypervisor(settings)
    plain.migrator = mover = DefinitionMover()
    plain.create_partition(host, PartitionSpec("p1", cpus=1, memory_mb=64))
    plain.start_partition(host, "p1")
    plain.migrate_partition(host, "p1", other)
    (request,) = mover.requests
    assert (request.max_downtime_ms, request.auto_converge, request.parallel_connections) == (None, False, 0)

    monkeypatch.setenv("QRM_QEMU_MIGRATION_MAX_DOWNTIME", "500")
    monkeypatch.setenv("QRM_QEMU_MIGRATION_AUTO_CONVERGE", "true")
    monkeypatch.setenv("QRM_QEMU_MIGRATION_PARALLEL", "4")
    tuned = QemuHypervisor(settings)
    tuned.migrator = mover = DefinitionMover()
    tuned.migrate_partition(other, "p1", host)
    (request,) = mover.requests
    assert (request.max_downtime_ms, request.auto_converge, request.parallel_connections) == (500, True, 4)
    assert [p.name for p in tuned.list_partitions(host)] == ["p1"]


@pytest.mark.parametrize("value", ["-1", "10001"])
def test_an_insane_downtime_is_refused(monkeypatch, value) -> None:
    from qrm_core.errors import QrmError
    from qrm_qemu.settings import load

    monkeypatch.setenv("QRM_QEMU_MIGRATION_MAX_DOWNTIME", value)
    with pytest.raises((QrmError, ValueError)):
        load()
