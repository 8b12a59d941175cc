"""The lab's machines: QEMU under TCG with a virtio-net NIC and its iPXE ROM, booting from the network.

Each machine is a ``qemu-system-x86_64`` process inside the lab's network
namespace, on a tap of the lab's bridge, with ``-boot n``: SeaBIOS runs the
NIC's iPXE ROM (Debian's ``ipxe-qemu``), iPXE asks DHCP, fetches
``boot.ipxe`` and its per-MAC script over TFTP, the kernel and initrd over
HTTP from ``qrm server``, and the node agent registers - the same path as a
real machine (docs/netboot.md). There is no ``-no-reboot``: when qrm orders a
reboot the guest resets and goes through the firmware and iPXE again, and
powering off (``halt``) ends the process.

A machine with ``firmware="uefi"`` runs OVMF (Debian's ``ovmf``) instead of
SeaBIOS: the firmware code as a read-only pflash, its variables (its NVRAM:
boot entries) in a private writable copy per machine
(``<lab>/vms/<name>/efivars.fd``, made from OVMF's empty template). Its
virtio-net NIC has no option ROM: with ``efi-virtio.rom`` OVMF would start the
ROM's iPXE straight away (iPXE's EFI driver offers itself as the NIC's boot
option), the path of a NIC flashed with iPXE, which the BIOS machines already
take. Without it OVMF's own virtio-net driver and PXE client boot the machine
as UEFI firmware does on real hardware: DHCP with client architecture 7,
``ipxe.efi`` over TFTP (qrm-dhcpd's choice for that architecture), and from
there iPXE's path as above (``boot.ipxe``, the per-MAC script, the kernel's EFI
stub). Measured: docs/benchmarks.md, "Network boot".

The serial console is appended to ``<lab>/vms/<name>/console.log``
(``qrm lab console NAME``). Debian's iPXE ROM prints on the screen only, so a
BIOS machine's log starts at the kernel; OVMF writes its console to the serial
port too, so a UEFI machine's log has the firmware's PXE lines and ``ipxe.efi``'s
output before the kernel. KVM is not used: the development and CI machines
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
FIRMWARES = ("bios", "uefi")
#: OVMF (firmware code, empty variable store) as Debian 12 ships it (``ovmf``: the 4 MB build
#: QEMU's own firmware descriptor picks, then the 2 MB one older releases have); no Secure Boot.
OVMF_PAIRS = (
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
)
OVMF_PACKAGE = "ovmf"
#: A UEFI machine's variable store, in its directory under the lab's.
VARS_FILE = "efivars.fd"
#: What OVMF's PXE client gets from qrm-dhcpd and qrm-tftpd serves (Debian's ``ipxe``).
IPXE_EFI = Path("/usr/lib/ipxe/ipxe.efi")


@dataclass
class VmSpec:
    """One machine of the lab; the process record is kept by the lab's state."""

    name: str
    mac: str
    tap: str
    cpus: int
    memory_mb: int
    nic: str = "virtio-net-pci"
    #: ``bios`` (SeaBIOS) or ``uefi`` (OVMF).
    firmware: str = "bios"
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
            firmware=str(data.get("firmware", "bios")),
            extra=[str(x) for x in data.get("extra", [])],
        )


def vm_spec(index: int, *, cpus: int, memory_mb: int, firmware: str = "bios") -> VmSpec:
    """Machine number ``index`` (1-based): name ``vmN``, MAC ``52:54:00:77:00:NN``, tap ``tapN``."""
    if not 1 <= index <= MAX_VMS:
        raise InvalidInput(f"the lab has room for 1 to {MAX_VMS} machines")
    if firmware not in FIRMWARES:
        raise InvalidInput(f"--firmware {firmware!r}: use bios or uefi")
    return VmSpec(
        name=f"vm{index}",
        mac=f"{MAC_PREFIX}:{index:02x}",
        tap=f"tap{index}",
        cpus=cpus,
        memory_mb=memory_mb,
        firmware=firmware,
    )


def firmware_list(firmware: str, vms: int) -> list[str]:
    """``--firmware``: one of bios/uefi for every machine, or a comma-separated list, one per machine."""
    names = [part.strip().lower() for part in firmware.split(",")]
    for name in names:
        if name not in FIRMWARES:
            raise InvalidInput(f"--firmware {firmware!r}: use bios or uefi (or a list, one per machine)")
    if len(names) == 1:
        return names * vms
    if len(names) != vms:
        raise InvalidInput(f"--firmware {firmware!r}: give one firmware, or one per machine ({vms})")
    return names


def find_ovmf() -> tuple[Path, Path] | None:
    """OVMF's code and variable template, or None."""
    for code, variables in OVMF_PAIRS:
        if code.is_file() and variables.is_file():
            return code, variables
    return None


def require_ovmf() -> tuple[Path, Path]:
    found = find_ovmf()
    if found is None:
        raise InvalidInput(f"UEFI machines need OVMF: apt-get install {OVMF_PACKAGE}")
    return found


def make_vars(path: Path, *, fresh: bool) -> Path:
    """The machine's own writable copy of OVMF's variable store (a new one if ``fresh`` or absent)."""
    _, template = require_ovmf()
    if fresh or not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        path.chmod(0o600)
    return path


def check_sizes(cpus: int, memory_mb: int) -> None:
    if not 1 <= cpus <= 16:
        raise InvalidInput(f"--cpus {cpus}: give 1 to 16 CPUs per machine")
    if not 192 <= memory_mb <= 16384:
        # The agent unpacks a VE's root into RAM: less than 192 MB does not boot it.
        raise InvalidInput(f"--memory {memory_mb}: give 192 to 16384 MB per machine")


def _escape(path: Path) -> str:
    # QEMU's option syntax doubles a comma inside a value.
    return str(path).replace(",", ",,")


def disk_option(image: Path) -> str:
    """The ``-drive`` value of a raw disk image a lab machine sees as a virtio disk (``/dev/vdX``)."""
    return f"file={_escape(image)},format=raw,if=virtio,cache=unsafe"


def firmware_argv(spec: VmSpec, vars_path: Path | None) -> list[str]:
    """SeaBIOS is QEMU's default; OVMF comes as two pflash drives: code (read-only) and variables."""
    if spec.firmware == "bios":
        return []
    if vars_path is None:
        raise InvalidInput(f"{spec.name}: a UEFI machine needs its variable store")
    code, _ = require_ovmf()
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={_escape(code)}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={_escape(vars_path)}",
    ]


def nic_rom(spec: VmSpec) -> str:
    """QEMU's default ROM (iPXE) under SeaBIOS; none under OVMF, whose own PXE client boots."""
    return ",romfile=" if spec.firmware == "uefi" else ""


def qemu_argv(spec: VmSpec, console: Path, vars_path: Path | None = None) -> list[str]:
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
        *firmware_argv(spec, vars_path),
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
        f"file,id=console,path={_escape(console)},append=on",
        "-serial",
        "chardev:console",
        "-boot",
        "n",
        "-netdev",
        f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
        "-device",
        f"{spec.nic},netdev=net0,mac={spec.mac}{nic_rom(spec)}",
        *spec.extra,
    ]
