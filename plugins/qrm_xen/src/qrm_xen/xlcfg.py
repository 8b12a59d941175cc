"""xl domain configuration files (``xl.cfg(5)``), one per partition.

openQRM's Xen plugin kept a config file per VM beside the hypervisor's own
state; qrm does the same: next to defining the partition through libvirt it
writes ``/etc/xen/<name>`` (the directory is a setting), so ``xl create
/etc/xen/<name>`` and xendomains (``/etc/xen/auto/``) know the guest too.
The file is always rendered from the partition's libvirt definition, so it
follows every persistent change qrm makes (memory, vCPUs, pinning).

Every value that reaches the file is checked against a strict alphabet
first (:func:`check_value`): xl strings have no escape that qrm needs, so a
quote, a backslash, a newline or any control character is refused, and with
them every way to end a string and start another setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qrm_core.plugin_api import InvalidInput
from qrm_libvirt.domxml import BRIDGE_RE, PATH_RE, DomainFacts, format_cpuset

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
#: Kernel arguments: printable ASCII without quotes, backslash or ``#``.
KERNEL_ARGS_RE = re.compile(r"[A-Za-z0-9 _.,:;=+/@%^*~\[\]{}()<>!?|$&-]{0,2048}")
NIC_MODELS = ("e1000", "rtl8139", "virtio-net")
HEADER = "# Written by qrm from the partition's libvirt definition; qrm rewrites it on every change.\n"


def check_value(what: str, value: str, pattern: re.Pattern[str]) -> str:
    """``value`` if it matches ``pattern`` entirely; InvalidInput naming ``what`` otherwise."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(f"{what} {value!r} cannot go into an xl config file (unsafe characters)")
    return value


@dataclass(frozen=True)
class XlConfig:
    """The settings of one xl config file, checked when built."""

    name: str
    mode: str  # "hvm" or "pv"
    memory_mb: int
    max_memory_mb: int
    vcpus: int
    max_vcpus: int
    mac: str
    bridge: str
    nic_model: str | None = None
    kernel: str | None = None
    ramdisk: str | None = None
    extra: str | None = None
    pinning: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_value("partition name", self.name, NAME_RE)
        if self.mode not in ("hvm", "pv"):
            raise InvalidInput(f"Xen guest type {self.mode!r}: use hvm or pv")
        check_value("MAC", self.mac, MAC_RE)
        check_value("bridge", self.bridge, BRIDGE_RE)
        if self.nic_model is not None and self.nic_model not in NIC_MODELS:
            raise InvalidInput(f"NIC model {self.nic_model!r}: use {', '.join(NIC_MODELS)}")
        for what, path in (("kernel", self.kernel), ("ramdisk", self.ramdisk)):
            if path is not None:
                check_value(what, path, PATH_RE)
        if self.extra is not None:
            check_value("kernel arguments", self.extra, KERNEL_ARGS_RE)
        if self.mode == "pv" and not self.kernel:
            raise InvalidInput(f"PV guest {self.name} needs a kernel (host setting pv_kernel)")
        for number in (self.memory_mb, self.max_memory_mb, self.vcpus, self.max_vcpus):
            if not isinstance(number, int) or number < 1:
                raise InvalidInput(f"xl config of {self.name}: sizes must be positive integers")

    @classmethod
    def from_facts(cls, facts: DomainFacts) -> XlConfig:
        """The config of a partition as libvirt defines it (its inactive XML)."""
        mode = "pv" if facts.os_type in ("linux", "xen") else "hvm"
        return cls(
            name=facts.name,
            mode=mode,
            memory_mb=max(1, facts.memory_kib // 1024),
            max_memory_mb=max(1, facts.max_memory_kib // 1024),
            vcpus=facts.vcpus,
            max_vcpus=facts.max_vcpus,
            mac=facts.mac,
            bridge=facts.bridges[0] if facts.bridges else "",
            nic_model=facts.nic_model if mode == "hvm" else None,
            kernel=facts.kernel,
            ramdisk=facts.initrd,
            extra=facts.cmdline,
            pinning=dict(facts.pinning),
        )

    def vif(self) -> str:
        parts = [f"mac={self.mac}", f"bridge={self.bridge}"]
        if self.mode == "hvm":
            parts.append("type=ioemu")
            if self.nic_model:
                parts.append(f"model={self.nic_model}")
        return ",".join(parts)

    def cpus(self) -> list[str]:
        """``cpus = [...]``: entry N is virtual CPU N's host CPUs (``all`` where unpinned)."""
        if not self.pinning:
            return []
        return [
            format_cpuset(self.pinning[vcpu]) if vcpu in self.pinning else "all"
            for vcpu in range(max(self.pinning) + 1)
        ]

    def settings(self) -> list[tuple[str, str | int | list[str]]]:
        """The ``key = value`` pairs of the file, in order."""
        items: list[tuple[str, str | int | list[str]]] = [
            ("name", self.name),
            ("type", self.mode),
            ("memory", self.memory_mb),
            ("maxmem", self.max_memory_mb),
            ("vcpus", self.vcpus),
            ("maxvcpus", self.max_vcpus),
        ]
        if self.cpus():
            items.append(("cpus", self.cpus()))
        if self.mode == "pv":
            assert self.kernel is not None
            items.append(("kernel", self.kernel))
            if self.ramdisk:
                items.append(("ramdisk", self.ramdisk))
            if self.extra:
                items.append(("extra", self.extra))
        else:
            items.append(("boot", "n"))
            items.append(("serial", "pty"))
        items += [
            ("vif", [self.vif()]),
            ("on_poweroff", "destroy"),
            ("on_reboot", "restart"),
            ("on_crash", "destroy"),
        ]
        return items

    def render(self) -> str:
        lines = [HEADER]
        for key, value in self.settings():
            lines.append(f"{key} = {_literal(value)}\n")
        return "".join(lines)


def _literal(value: str | int | list[str]) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[ " + ", ".join(_quoted(v) for v in value) + " ]"
    return _quoted(value)


def _quoted(text: str) -> str:
    # Every value was checked: it holds no quote, backslash, newline or control character.
    if any(c in text for c in "\"'\\\n\r") or any(ord(c) < 32 for c in text):
        raise InvalidInput(f"value {text!r} cannot go into an xl config file")
    return f'"{text}"'
