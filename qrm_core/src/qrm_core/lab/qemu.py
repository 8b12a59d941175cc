"""The lab's machines: QEMU under TCG with a virtio-net NIC and its iPXE ROM, booting from the network.

Each machine is a ``qemu-system-x86_64`` process inside the lab's network
namespace, on a tap of the lab's bridge, with ``-boot n``: SeaBIOS runs the
NIC's iPXE ROM (Debian's ``ipxe-qemu``), iPXE asks DHCP, fetches
``boot.ipxe`` and its per-MAC script over TFTP, the kernel and initrd over
HTTP from ``qrm server``, and the node agent registers - the same path as a
real machine (docs/netboot.md). There is no ``-no-reboot``: when qrm orders a
reboot the guest resets and goes through the firmware and iPXE again, and
powering off (``halt``) ends the process.

The serial console is appended to ``<lab>/vms/<name>/console.log``
(``qrm lab console NAME``). Debian's iPXE prints on the screen only, so the
log starts at the kernel. KVM is not used: the development and CI machines
have none that runs ordinary guests (shared/notes: TCG only), and TCG is the
same everywhere.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qrm_core.errors import InvalidInput

QEMU = "qemu-system-x86_64"
#: The ROM QEMU loads for virtio-net-pci (ipxe-qemu).
VIRTIO_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")
#: Locally administered range QEMU uses; the lab's machines are 52:54:00:77:00:NN.
MAC_PREFIX = "52:54:00:77:00"
NAME_RE = re.compile(r"^vm[0-9]{1,3}$")
MAX_VMS = 32


@dataclass
class VmSpec:
    """One machine of the lab; the process record is kept by the lab's state."""

    name: str
    mac: str
    tap: str
    cpus: int
    memory_mb: int
    nic: str = "virtio-net-pci"
    extra: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmSpec:
        return cls(
            name=str(data["name"]),
            mac=str(data["mac"]),
            tap=str(data["tap"]),
            cpus=int(data["cpus"]),
            memory_mb=int(data["memory_mb"]),
            nic=str(data.get("nic", "virtio-net-pci")),
            extra=[str(x) for x in data.get("extra", [])],
        )


def vm_spec(index: int, *, cpus: int, memory_mb: int) -> VmSpec:
    """Machine number ``index`` (1-based): name ``vmN``, MAC ``52:54:00:77:00:NN``, tap ``tapN``."""
    if not 1 <= index <= MAX_VMS:
        raise InvalidInput(f"the lab has room for 1 to {MAX_VMS} machines")
    return VmSpec(
        name=f"vm{index}", mac=f"{MAC_PREFIX}:{index:02x}", tap=f"tap{index}", cpus=cpus, memory_mb=memory_mb
    )


def check_sizes(cpus: int, memory_mb: int) -> None:
    if not 1 <= cpus <= 16:
        raise InvalidInput(f"--cpus {cpus}: give 1 to 16 CPUs per machine")
    if not 192 <= memory_mb <= 16384:
        # The agent unpacks a VE's root into RAM: less than 192 MB does not boot it.
        raise InvalidInput(f"--memory {memory_mb}: give 192 to 16384 MB per machine")


def qemu_argv(spec: VmSpec, console: Path) -> list[str]:
    """The QEMU command line of one machine (run inside the lab's namespace)."""
    qemu = shutil.which(QEMU) or QEMU
    return [
        qemu,
        "-name",
        spec.name,
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-m",
        str(spec.memory_mb),
        "-smp",
        str(spec.cpus),
        # No default devices (VGA, IDE CD-ROM, floppy, parallel port): less to emulate and for
        # the kernel to probe under TCG. Firmware and iPXE print on a screen nobody sees anyway.
        "-nodefaults",
        "-vga",
        "none",
        "-display",
        "none",
        "-chardev",
        # QEMU's option syntax doubles a comma inside a value.
        f"file,id=console,path={str(console).replace(',', ',,')},append=on",
        "-serial",
        "chardev:console",
        "-boot",
        "n",
        "-netdev",
        f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
        "-device",
        f"{spec.nic},netdev=net0,mac={spec.mac}",
        *spec.extra,
    ]
