"""The xen driver against libvirt's test driver (domain type xen; Xen itself cannot run
here, see conftest.py): core's conformance kit, then what is Xen's own - HVM and PV
definitions, the xl config file of each partition (written, rewritten after persistent
changes, linked for autostart, moved with a migration, removed with the partition),
host settings and bad input."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qrm_core.conformance import HypervisorContract
from qrm_core.plugin_api import DriverError, HostTarget, InvalidInput, NotFound, PartitionSpec
from qrm_libvirt.testing import DefinitionMover, assert_valid_domain, test_host
from qrm_xen.driver import XenHypervisor
from qrm_xen.xlcfg import XlConfig


@pytest.fixture
def driver(libvirt, settings) -> XenHypervisor:
    return XenHypervisor(settings)


@pytest.fixture
def host(tmp_path: Path) -> HostTarget:
    return test_host(tmp_path / "hosts", "xen1", resource_id=1, cpus=4, memory_mb=8192)


@pytest.fixture
def other_host(tmp_path: Path) -> HostTarget:
    return test_host(tmp_path / "hosts", "xen2", resource_id=2, cpus=4, memory_mb=8192)


class TestXenConformance(HypervisorContract):
    """Core's conformance kit. test_migration runs through the DefinitionMover seam (the
    test driver has no migration); everything else is the test driver itself."""

    @pytest.fixture
    def driver(self, libvirt, settings) -> XenHypervisor:
        made = XenHypervisor(settings)
        made.migrator = DefinitionMover()
        return made

    @pytest.fixture
    def other_host(self, tmp_path: Path) -> HostTarget:
        return test_host(tmp_path / "hosts", "xen2", resource_id=2, cpus=4, memory_mb=8192)


def connection(driver, host):
    """The driver's own connection: each connection to a test-driver node file has its own state."""
    return driver.pool().get(host.uri, host.label)


def spec(name: str = "p1", **changes) -> PartitionSpec:
    values = dict(name=name, cpus=1, memory_mb=256, mac="00:16:3e:00:10:01", max_cpus=2, max_memory_mb=512)
    values.update(changes)
    return PartitionSpec(**values)


def config_of(xen_dir: Path, name: str, xl_parser) -> dict:
    text = (xen_dir / name).read_text()
    keys = {"name": str, "type": str, "memory": int, "maxmem": int, "vcpus": int, "maxvcpus": int}
    keys |= {"vif": list, "cpus": list, "boot": str, "kernel": str, "ramdisk": str, "extra": str}
    parsed = xl_parser.parse(text, keys)
    assert parsed.ok, parsed.report
    return parsed.values


def test_hvm_partitions_network_boot_with_an_xl_config(driver, host, xen_dir, libvirt, xl_parser) -> None:
    info = driver.create_partition(host, spec())
    assert (info.state, info.mac, info.max_cpus, info.max_memory_mb) == (
        "stopped",
        "00:16:3e:00:10:01",
        2,
        512,
    )
    xml = connection(driver, host).lookupByName("p1").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert_valid_domain(xml)
    root = ET.fromstring(xml)
    assert root.get("type") == "xen"
    assert root.find("os/type").text == "hvm" and root.find("os/boot").get("dev") == "network"
    nic = root.find("devices/interface")
    assert nic.find("source").get("bridge") == "xenbr0" and nic.find("model").get("type") == "e1000"
    assert nic.find("script").get("path") == "vif-bridge"
    values = config_of(xen_dir, "p1", xl_parser)
    assert values["type"] == "hvm" and values["boot"] == "n"
    assert (values["memory"], values["maxmem"], values["vcpus"], values["maxvcpus"]) == (256, 512, 1, 2)
    assert values["vif"] == ["mac=00:16:3e:00:10:01,bridge=xenbr0,type=ioemu,model=e1000"]
    assert not (xen_dir / "auto" / "p1").exists()


def test_persistent_changes_rewrite_the_config(driver, host, xen_dir, xl_parser) -> None:
    driver.create_partition(host, spec())
    driver.set_memory(host, "p1", 384, live=False)
    driver.set_vcpus(host, "p1", 2, live=False)
    driver.pin_vcpus(host, "p1", {0: (1,), 1: (2, 3)}, live=False)
    values = config_of(xen_dir, "p1", xl_parser)
    assert (values["memory"], values["vcpus"], values["cpus"]) == (384, 2, ["1", "2-3"])
    driver.start_partition(host, "p1")
    driver.set_memory(host, "p1", 300, persistent=False)  # live only: the file keeps the definition's
    assert config_of(xen_dir, "p1", xl_parser)["memory"] == 384
    assert driver.get_partition(host, "p1").memory_mb == 300


def test_the_config_goes_with_the_partition(driver, host, xen_dir) -> None:
    driver.create_partition(host, spec())
    assert (xen_dir / "p1").exists()
    driver.start_partition(host, "p1")
    driver.destroy_partition(host, "p1")
    assert not (xen_dir / "p1").exists()
    with pytest.raises(NotFound):
        driver.destroy_partition(host, "p1")


def test_autostart_links_the_config_for_xendomains(driver, tmp_path, xen_dir, libvirt) -> None:
    host = test_host(tmp_path / "hosts", "xen3", resource_id=3, settings={"autostart": "true"})
    driver.create_partition(host, spec())
    link = xen_dir / "auto" / "p1"
    assert link.is_symlink() and os.readlink(link) == str(xen_dir / "p1")
    assert connection(driver, host).lookupByName("p1").autostart() == 1
    driver.destroy_partition(host, "p1")
    assert not link.is_symlink() and not (xen_dir / "p1").exists()


def test_pv_partitions_boot_qrms_kernel(driver, tmp_path, xen_dir, libvirt, xl_parser) -> None:
    host = test_host(
        tmp_path / "hosts",
        "xen4",
        resource_id=4,
        network="br-prov",
        settings={
            "xen_mode": "pv",
            "pv_kernel": "/var/lib/qrm/vmlinuz",
            "pv_ramdisk": "/var/lib/qrm/initrd",
            "pv_cmdline": "console=hvc0 qrm.server=http://10.0.0.1:8080",
        },
    )
    driver.create_partition(host, spec("pv1", mac="00:16:3e:00:10:02"))
    xml = connection(driver, host).lookupByName("pv1").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert_valid_domain(xml)
    root = ET.fromstring(xml)
    assert root.find("os/type").text == "linux" and root.find("os/kernel").text == "/var/lib/qrm/vmlinuz"
    assert root.find("devices/console/target").get("type") == "xen"
    values = config_of(xen_dir, "pv1", xl_parser)
    assert values["type"] == "pv" and values["kernel"] == "/var/lib/qrm/vmlinuz"
    assert values["ramdisk"] == "/var/lib/qrm/initrd"
    assert values["extra"] == "console=hvc0 qrm.server=http://10.0.0.1:8080"
    assert values["vif"] == ["mac=00:16:3e:00:10:02,bridge=br-prov"]


def test_migration_moves_the_config(driver, host, other_host, tmp_path, xl_parser) -> None:
    """Through the DefinitionMover seam: the test driver cannot migrate."""
    driver.migrator = DefinitionMover()
    dirs = {h.hostname: tmp_path / f"etc-xen-{h.hostname}" for h in (host, other_host)}
    source = HostTarget(**{**host.__dict__, "settings": {"xl_config_dir": str(dirs["xen1"])}})
    dest = HostTarget(**{**other_host.__dict__, "settings": {"xl_config_dir": str(dirs["xen2"])}})
    driver.create_partition(source, spec())
    driver.start_partition(source, "p1")
    driver.migrate_partition(source, "p1", dest)
    assert not (dirs["xen1"] / "p1").exists()
    assert config_of(dirs["xen2"], "p1", xl_parser)["name"] == "p1"
    assert driver.get_partition(dest, "p1").state == "running"
    request = driver.migrator.requests[0]
    assert request.live and request.migrate_uri == "tcp://192.0.2.10" and request.mode == "managed"


def test_without_the_seam_the_test_driver_cannot_migrate(driver, host, other_host) -> None:
    assert "migrate_partition" not in driver.supported_operations(host)
    driver.create_partition(host, spec())
    from qrm_core.plugin_api import UnsupportedOperation

    with pytest.raises(UnsupportedOperation) as info:
        driver.migrate_partition(host, "p1", other_host)
    assert info.value.message == "xen on xen1 cannot migrate partitions"


def test_a_config_xens_parser_rejects_undoes_the_create(driver, host, xen_dir, monkeypatch) -> None:
    """The check is real: a renderer gone wrong (simulated by breaking render) leaves nothing."""
    monkeypatch.setattr(XlConfig, "render", lambda self: 'name = "p1\n')
    with pytest.raises(DriverError, match="rejected by Xen's parser"):
        driver.create_partition(host, spec())
    assert driver.list_partitions(host) == []
    assert not (xen_dir / "p1").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"xen_mode": "pvh"}, "use hvm or pv"),
        ({"xen_mode": "pv"}, "names no kernel"),
        ({"xen_mode": "pv", "pv_kernel": "/boot/vmlinuz", "pv_cmdline": "quiet\nmemory=1"}, "unsafe"),
        ({"pv_kernel": "/boot/../etc/shadow"}, "must not contain"),
        ({"xl_config_dir": "etc/xen"}, "unsafe"),
        ({"autostart": "maybe"}, "use true or false"),
        ({"nic_model": "ne2k"}, "e1000"),
        ({"migration": "teleport"}, "managed or p2p"),
        ({"shutdown_timeout": "-1"}, "seconds"),
        ({"bogus": "1"}, "unknown xen host setting"),
    ],
)
def test_bad_host_settings_are_one_line(driver, host, settings, message) -> None:
    bad = HostTarget(**{**host.__dict__, "settings": settings})
    with pytest.raises(InvalidInput) as info:
        driver.create_partition(bad, spec())
    assert message in info.value.message and "\n" not in info.value.message
    assert driver.list_partitions(host) == []


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("qemu+ssh://root@10.0.0.5/system", "is not a xen URI"),
        ("xen+ext:///system?command=/tmp/evil", "transport 'ext'"),
        ("xen+ssh://root@10.0.0.5/system?netcat=/tmp/evil", "parameter 'netcat'"),
        ("xen+ssh://root@bad_host!/system", "is not a host name"),
        ("xen+ssh://root@10.0.0.5/system\nx", "control characters"),
    ],
)
def test_bad_uris_are_one_line(driver, host, uri, message) -> None:
    with pytest.raises(InvalidInput) as info:
        driver.validate_host(HostTarget(**{**host.__dict__, "uri": uri}))
    assert message in info.value.message and "\n" not in info.value.message


def test_the_default_uri_is_xen_over_ssh(driver, host) -> None:
    assert driver.uri(HostTarget(**{**host.__dict__, "uri": None})) == "xen+ssh://root@192.0.2.10/system"
    assert driver.uri(HostTarget(**{**host.__dict__, "uri": None, "address": "fd00::5"})) == (
        "xen+ssh://root@[fd00::5]/system"
    )
    with pytest.raises(InvalidInput, match="--libvirt-uri"):
        driver.uri(HostTarget(**{**host.__dict__, "uri": None, "address": None}))
