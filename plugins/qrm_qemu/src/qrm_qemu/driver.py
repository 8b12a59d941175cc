"""The ``qemu`` hypervisor driver: QEMU/KVM machines on hosts reached through libvirt.

Everything but the domain XML is the shared libvirt driver
(:class:`qrm_libvirt.driver.LibvirtHypervisor`). A partition is a PC
(``hvm``) with one NIC on the host's provisioning bridge, first in the boot
order, so it PXE-boots into qrm like any machine; a virtio balloon lets its
memory change within the maximum set at create; vCPUs can be hot-added up to
the maximum. No ``<cpu>`` element: QEMU's default CPU model, which works
under KVM and TCG alike (``host-passthrough`` does not start on some hosts).

The domain type is decided per host: ``kvm`` where libvirt offers it and the
host CPU has VT-x or AMD-V (``vmx``/``svm`` in the capabilities), else
``qemu`` (TCG, emulation); a host setting ``domain_type`` overrides it.
"""

from __future__ import annotations

import re
import threading
import xml.etree.ElementTree as ET
from typing import Any, ClassVar

from qrm_core.plugin_api import HostTarget, InvalidInput, PartitionSpec
from qrm_libvirt.domxml import DomainDefinition, Nic
from qrm_libvirt.driver import LibvirtHypervisor
from qrm_qemu.settings import QemuSettings

DOMAIN_TYPES = ("kvm", "qemu")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139")
_MACHINE = re.compile(r"[a-z][a-z0-9._-]{0,63}")


def detect_domain_type(capabilities_xml: str) -> str:
    """``kvm`` if libvirt offers kvm guests and the host CPU can virtualise, else ``qemu``."""
    root = ET.fromstring(capabilities_xml)
    offered = {d.get("type") for d in root.findall("guest/arch/domain")}
    features = {f.get("name") for f in root.findall("host/cpu/feature")}
    if "kvm" in offered and features & {"vmx", "svm"}:
        return "kvm"
    return "qemu"


class QemuHypervisor(LibvirtHypervisor):
    name = "qemu"
    description = "QEMU/KVM virtual machines on hosts reached through libvirt (qemu+ssh://root@HOST/system)"
    family = "qemu"
    default_uri = "qemu+ssh://root@{address}/system"
    mac_prefix = "52:54:00"
    settings_class = QemuSettings
    default_bridge = "br0"
    undefine_flags = ("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA")
    flavour_host_settings: ClassVar[dict[str, str]] = {
        "domain_type": "kvm, qemu (TCG) or auto (kvm where the host can)",
        "nic_model": "virtio, e1000, e1000e or rtl8139",
        "machine": "QEMU machine type (default: the host's default pc)",
    }

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self._types: dict[str, str] = {}
        self._types_lock = threading.Lock()

    def own_settings(self) -> QemuSettings:
        own = super().own_settings()
        assert isinstance(own, QemuSettings)
        return own

    def migration_tuning(self) -> dict[str, Any]:
        own = self.own_settings()
        return {
            "max_downtime_ms": own.migration_max_downtime or None,
            "auto_converge": own.migration_auto_converge,
            "parallel_connections": own.migration_parallel,
        }

    def check_host_setting(self, key: str, value: str) -> None:
        if key == "domain_type" and value not in (*DOMAIN_TYPES, "auto"):
            raise InvalidInput(f"host setting domain_type={value!r}: use kvm, qemu or auto")
        if key == "nic_model" and value not in NIC_MODELS:
            raise InvalidInput(f"host setting nic_model={value!r}: use {', '.join(NIC_MODELS)}")
        if key == "machine" and not _MACHINE.fullmatch(value):
            raise InvalidInput(f"host setting machine={value!r} is not a QEMU machine type")

    def domain_type(self, host: HostTarget, conn: Any) -> str:
        """The host's domain type: its setting, else what its capabilities say (asked once per URI)."""
        chosen = self.host_setting(host, "domain_type") or self.own_settings().domain_type
        if chosen in DOMAIN_TYPES:
            return chosen
        uri = self.uri(host)
        with self._types_lock:
            known = self._types.get(uri)
        if known is None:
            known = detect_domain_type(conn.getCapabilities())
            with self._types_lock:
                self._types[uri] = known
        return known

    def definition(self, host: HostTarget, conn: Any, spec: PartitionSpec) -> DomainDefinition:
        settings = self.own_settings()
        model = self.host_setting(host, "nic_model") or settings.nic_model
        return DomainDefinition(
            name=spec.name,
            domain_type=self.domain_type(host, conn),
            memory_kib=spec.memory_mb * 1024,
            max_memory_kib=(spec.max_memory_mb or spec.memory_mb) * 1024,
            vcpus=spec.cpus,
            max_vcpus=spec.max_cpus or spec.cpus,
            nic=Nic(mac=self.mac(spec), bridge=self.bridge(host, spec), model=model, boot_order=1),
            os_type="hvm",
            machine=self.host_setting(host, "machine"),
            features=("acpi", "apic"),
            console="serial",
            console_log=self.console_log(host, spec.name),
            balloon="virtio",
        )
