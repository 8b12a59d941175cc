"""Domain XML: built as an element tree (never by pasting strings), read back into facts.

Both hypervisor plugins describe a partition as a :class:`DomainDefinition`
(the QEMU plugin a ``kvm``/``qemu`` machine that boots from its NIC, the Xen
plugin a PV or HVM guest) and :func:`render` turns it into libvirt's domain
XML. ElementTree escapes every value, so no name or argument can add an
element; the drivers still check every value against a strict alphabet
first, and libvirt validates the result against its RelaxNG schema
(``VIR_DOMAIN_DEFINE_VALIDATE``) when it is defined. :func:`parse` reads what
qrm needs back out of the XML libvirt reports (sizes, MAC, pinning).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field

#: The XML namespace of qrm's element in a domain's ``<metadata>``.
QRM_NS = "https://qrm.dev/libvirt/partition/1"


@dataclass(frozen=True)
class Nic:
    """The partition's one NIC: on ``bridge``, with qrm's ``mac``.

    :ivar model: ``virtio``, ``e1000``, ``rtl8139``; None: the hypervisor's default (Xen PV: netfront).
    :ivar boot_order: Its place in the boot order (1: first); None: not a boot device.
    :ivar script: Xen's hotplug script (``vif-bridge``).
    """

    mac: str
    bridge: str
    model: str | None = "virtio"
    boot_order: int | None = 1
    script: str | None = None


@dataclass(frozen=True)
class DomainDefinition:
    """Everything qrm puts in a domain's XML.

    Sizes: ``memory_kib`` is the balloon at start (``currentMemory``),
    ``max_memory_kib`` the ceiling (``memory``); ``vcpus`` are online at start,
    ``max_vcpus`` can be hot-added.
    """

    name: str
    domain_type: str
    memory_kib: int
    max_memory_kib: int
    vcpus: int
    max_vcpus: int
    nic: Nic
    os_type: str = "hvm"
    arch: str = "x86_64"
    machine: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    #: ``<boot dev=...>`` in ``<os>`` (Xen HVM); QEMU uses the NIC's boot order instead.
    boot_dev: str | None = None
    features: tuple[str, ...] = ("acpi", "apic")
    #: ``serial`` (a PC serial port with a pty) or ``xen`` (the PV console).
    console: str = "serial"
    #: A file that receives everything written to the console, if set.
    console_log: str | None = None
    #: ``<memballoon model=...>``; None: no element (the hypervisor's default).
    balloon: str | None = "virtio"
    pinning: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    #: Kept in ``<metadata>`` (qrm's namespace): who made the domain.
    managed_by: str | None = "qrm"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def format_cpuset(cpus: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``0-2,5`` (libvirt's cpuset syntax)."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = prev = None
    for cpu in ordered:
        if start is None:
            start = prev = cpu
        elif prev is not None and cpu == prev + 1:
            prev = cpu
        else:
            parts.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = cpu
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(parts)


def parse_cpuset(text: str) -> tuple[int, ...]:
    """libvirt's cpuset syntax (``0-3,^2,5``) -> ``(0, 1, 3, 5)``."""
    include: set[int] = set()
    exclude: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        target = include
        if part.startswith("^"):
            target, part = exclude, part[1:]
        if "-" in part:
            lo, _, hi = part.partition("-")
            target.update(range(int(lo), int(hi) + 1))
        else:
            target.add(int(part))
    return tuple(sorted(include - exclude))


def render(d: DomainDefinition) -> str:
    """The domain XML for ``d`` (a string for ``defineXMLFlags``)."""
    root = ET.Element("domain", {"type": d.domain_type})
    _sub(root, "name", d.name)
    if d.managed_by:
        metadata = _sub(root, "metadata")
        ET.SubElement(
            metadata,
            f"{{{QRM_NS}}}partition",
            {"managed-by": d.managed_by},
        )
    _sub(root, "memory", str(d.max_memory_kib), unit="KiB")
    _sub(root, "currentMemory", str(d.memory_kib), unit="KiB")
    _sub(root, "vcpu", str(d.max_vcpus), placement="static", current=str(d.vcpus))
    if d.pinning:
        cputune = _sub(root, "cputune")
        for vcpu, cpus in sorted(d.pinning.items()):
            _sub(cputune, "vcpupin", vcpu=str(vcpu), cpuset=format_cpuset(cpus))
    os_el = _sub(root, "os")
    type_attrs = {"arch": d.arch}
    if d.machine:
        type_attrs["machine"] = d.machine
    _sub(os_el, "type", d.os_type, **type_attrs)
    if d.kernel:
        _sub(os_el, "kernel", d.kernel)
    if d.initrd:
        _sub(os_el, "initrd", d.initrd)
    if d.cmdline:
        _sub(os_el, "cmdline", d.cmdline)
    if d.boot_dev:
        _sub(os_el, "boot", dev=d.boot_dev)
    if d.features:
        features = _sub(root, "features")
        for feature in d.features:
            _sub(features, feature)
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", d.on_poweroff)
    _sub(root, "on_reboot", d.on_reboot)
    _sub(root, "on_crash", d.on_crash)
    devices = _sub(root, "devices")
    nic = _sub(devices, "interface", type="bridge")
    _sub(nic, "mac", address=d.nic.mac)
    _sub(nic, "source", bridge=d.nic.bridge)
    if d.nic.script:
        _sub(nic, "script", path=d.nic.script)
    if d.nic.model:
        _sub(nic, "model", type=d.nic.model)
    if d.nic.boot_order is not None:
        _sub(nic, "boot", order=str(d.nic.boot_order))
    if d.console == "xen":
        console = _sub(devices, "console", type="pty")
        if d.console_log:
            _sub(console, "log", file=d.console_log, append="on")
        _sub(console, "target", type="xen", port="0")
    else:
        serial = _sub(devices, "serial", type="pty")
        if d.console_log:
            _sub(serial, "log", file=d.console_log, append="on")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")
    if d.balloon:
        _sub(devices, "memballoon", model=d.balloon)
    ET.register_namespace("qrm", QRM_NS)
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class DomainFacts:
    """What qrm reads back from a domain's XML."""

    name: str
    uuid: str
    domain_type: str
    os_type: str
    memory_kib: int
    max_memory_kib: int
    vcpus: int
    max_vcpus: int
    macs: tuple[str, ...]
    bridges: tuple[str, ...]
    pinning: dict[int, tuple[int, ...]]
    managed_by: str | None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    boot_dev: str | None = None
    nic_model: str | None = None
    #: The balloon target qrm last set (``memory-target-kib`` in qrm's metadata element).
    memory_target_kib: int | None = None

    @property
    def mac(self) -> str:
        return self.macs[0] if self.macs else ""


_UNIT_KIB = {
    "b": 1 / 1024,
    "bytes": 1 / 1024,
    "k": 1,
    "kib": 1,
    "kb": 1000 / 1024,
    "m": 1024,
    "mib": 1024,
    "mb": 1000 * 1000 / 1024,
    "g": 1024 * 1024,
    "gib": 1024 * 1024,
    "gb": 1000**3 / 1024,
}


def _kib(element: ET.Element | None) -> int:
    if element is None or element.text is None:
        return 0
    factor = _UNIT_KIB.get((element.get("unit") or "KiB").lower(), 1)
    return int(int(element.text.strip()) * factor)


def _text(root: ET.Element, path: str) -> str | None:
    element = root.find(path)
    return element.text if element is not None else None


def parse(xml: str) -> DomainFacts:
    """The facts in a domain's XML (``XMLDesc``)."""
    root = ET.fromstring(xml)
    max_kib = _kib(root.find("memory"))
    current = root.find("currentMemory")
    vcpu = root.find("vcpu")
    max_vcpus = int((vcpu.text or "1").strip()) if vcpu is not None else 1
    vcpus = int(vcpu.get("current", max_vcpus)) if vcpu is not None else 1
    pinning = {
        int(pin.get("vcpu", "0")): parse_cpuset(pin.get("cpuset", ""))
        for pin in root.findall("cputune/vcpupin")
    }
    interfaces = root.findall("devices/interface")
    macs = tuple(
        (mac.get("address") or "").lower()
        for iface in interfaces
        if (mac := iface.find("mac")) is not None and mac.get("address")
    )
    bridges = tuple(
        source.get("bridge") or ""
        for iface in interfaces
        if (source := iface.find("source")) is not None and source.get("bridge")
    )
    model = interfaces[0].find("model") if interfaces else None
    marker = root.find(f"metadata/{{{QRM_NS}}}partition")
    boot = root.find("os/boot")
    os_type = root.find("os/type")
    return DomainFacts(
        name=_text(root, "name") or "",
        uuid=_text(root, "uuid") or "",
        domain_type=root.get("type", ""),
        os_type=(os_type.text or "") if os_type is not None else "",
        memory_kib=_kib(current) if current is not None else max_kib,
        max_memory_kib=max_kib,
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        macs=macs,
        bridges=bridges,
        pinning=pinning,
        managed_by=marker.get("managed-by") if marker is not None else None,
        kernel=_text(root, "os/kernel"),
        initrd=_text(root, "os/initrd"),
        cmdline=_text(root, "os/cmdline"),
        boot_dev=boot.get("dev") if boot is not None else None,
        nic_model=model.get("type") if model is not None else None,
        memory_target_kib=_int(marker.get("memory-target-kib")) if marker is not None else None,
    )


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


#: What reaches XML from outside qrm (bridge names, paths, kernel arguments) is checked with these.
BRIDGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
PATH_RE = re.compile(r"/[A-Za-z0-9_./+-]{0,1023}")
