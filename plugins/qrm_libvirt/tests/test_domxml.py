"""Domain XML: what the plugins render is valid for libvirt (its RelaxNG schema, and the
test driver defining it with VIR_DOMAIN_DEFINE_VALIDATE), no value can add an element,
and parse() reads back what render() wrote."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from qrm_libvirt.domxml import DomainDefinition, Nic, format_cpuset, parse, parse_cpuset, render
from qrm_libvirt.testing import assert_valid_domain


def qemu_domain(**changes) -> DomainDefinition:
    values = dict(
        name="web-1",
        domain_type="qemu",
        memory_kib=256 * 1024,
        max_memory_kib=512 * 1024,
        vcpus=1,
        max_vcpus=2,
        nic=Nic(mac="52:54:00:12:34:56", bridge="br0"),
        console_log="/var/log/qrm/web-1.log",
    )
    values.update(changes)
    return DomainDefinition(**values)


def xen_pv_domain(**changes) -> DomainDefinition:
    values = dict(
        name="pv1",
        domain_type="xen",
        os_type="linux",
        machine="xenpv",
        kernel="/boot/qrm/vmlinuz",
        initrd="/boot/qrm/initrd",
        cmdline="console=hvc0 qrm.server=http://10.0.0.1:8080",
        memory_kib=128 * 1024,
        max_memory_kib=256 * 1024,
        vcpus=1,
        max_vcpus=4,
        nic=Nic(mac="00:16:3e:00:00:01", bridge="xenbr0", model=None, boot_order=None, script="vif-bridge"),
        features=(),
        console="xen",
        balloon=None,
    )
    values.update(changes)
    return DomainDefinition(**values)


def xen_hvm_domain(**changes) -> DomainDefinition:
    values = dict(
        name="hvm1",
        domain_type="xen",
        machine="xenfv",
        boot_dev="network",
        memory_kib=256 * 1024,
        max_memory_kib=256 * 1024,
        vcpus=2,
        max_vcpus=2,
        nic=Nic(
            mac="00:16:3e:00:00:02", bridge="xenbr0", model="e1000", boot_order=None, script="vif-bridge"
        ),
        features=("acpi", "apic", "pae"),
        balloon=None,
        pinning={0: (0, 1), 1: (3,)},
    )
    values.update(changes)
    return DomainDefinition(**values)


LAYOUTS = {
    "qemu": qemu_domain,
    "kvm": lambda: qemu_domain(domain_type="kvm", machine="pc"),
    "xen-pv": xen_pv_domain,
    "xen-hvm": xen_hvm_domain,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rendered_domains_validate_against_libvirts_schema(schema, layout: str) -> None:
    assert_valid_domain(render(LAYOUTS[layout]()))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_test_driver_defines_them_with_validation(libvirt, layout: str) -> None:
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXMLFlags(render(LAYOUTS[layout]()), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        try:
            facts = parse(dom.XMLDesc(0))
            assert facts.domain_type == LAYOUTS[layout]().domain_type
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_parse_reads_back_what_render_wrote() -> None:
    facts = parse(render(xen_hvm_domain()))
    assert (facts.name, facts.domain_type, facts.os_type) == ("hvm1", "xen", "hvm")
    assert (facts.memory_kib, facts.max_memory_kib, facts.vcpus, facts.max_vcpus) == (262144, 262144, 2, 2)
    assert facts.mac == "00:16:3e:00:00:02" and facts.bridges == ("xenbr0",)
    assert facts.pinning == {0: (0, 1), 1: (3,)}
    assert facts.boot_dev == "network" and facts.nic_model == "e1000"
    assert facts.managed_by == "qrm" and facts.memory_target_kib is None
    pv = parse(render(xen_pv_domain()))
    assert (pv.kernel, pv.initrd, pv.os_type) == ("/boot/qrm/vmlinuz", "/boot/qrm/initrd", "linux")
    assert pv.cmdline == "console=hvc0 qrm.server=http://10.0.0.1:8080"


def test_the_network_boot_comes_first() -> None:
    root = ET.fromstring(render(qemu_domain()))
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "bridge"
    boot = nic.find("boot")
    assert boot is not None and boot.get("order") == "1"
    assert root.find("os/boot") is None  # per-device order only (libvirt refuses both)
    assert root.find("cpu") is None  # QEMU's default CPU model: host-passthrough fails on some hosts


@pytest.mark.parametrize(
    "hostile",
    [
        "</name><devices><disk type='file'/></devices><name>x",
        "a\nb",
        "x' onload='y",
        "&amp;<!ENTITY e SYSTEM 'file:///etc/passwd'>",
    ],
)
def test_values_are_text_never_markup(hostile: str) -> None:
    """ElementTree escapes every value: a hostile cmdline stays one text node (the
    drivers refuse such values before; this is the second line of defence)."""
    xml = render(xen_pv_domain(cmdline=hostile))
    root = ET.fromstring(xml)
    assert root.find("os/cmdline").text == hostile
    assert root.find("devices/disk") is None
    assert len(root.findall("name")) == 1


def test_cpusets() -> None:
    assert format_cpuset((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    assert format_cpuset((3,)) == "3"
    assert parse_cpuset("0-3,^2,5") == (0, 1, 3, 5)
    assert parse_cpuset(format_cpuset((1, 4, 5, 6))) == (1, 4, 5, 6)
