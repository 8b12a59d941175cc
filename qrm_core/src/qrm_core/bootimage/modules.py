"""Which kernel modules go into a boot image, and in which order they load.

Debian's kernels build every NIC driver as a module (none is built in), so the
initrd must carry the drivers and load them itself, dependencies first: the 8
modules behind virtio-net loaded in a guessed order leave a machine with no
NIC. The order comes from the kernel's own ``modules.dep`` (and the ``pre:``
soft dependencies of ``modules.softdep``, e.g. r8169 needs its ``realtek`` PHY
driver), never from guessing.

The selection is by group; a module the kernel does not have is skipped (a
kernel without ``bnx2`` still gets a boot image), but if a whole group the
agent needs comes out empty the build fails.

Module aliases (``pci:v00008086d0000100Esv*...``) are kept for the selected
modules and converted to POSIX extended regular expressions, so the agent can
match the machine's ``/sys/bus/*/devices/*/modalias`` with awk and load only
the drivers of hardware that is present (coldplug, as udev would).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qrm_core.errors import InvalidInput

#: Network drivers, virtual first. Large drivers that need firmware the kernel
#: package does not ship (ice, bnx2x, mlx5_core, sfc) are left to ``extra``.
NIC_MODULES: tuple[str, ...] = (
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "ixgbevf",
    "i40e",
    "iavf",
    "r8169",
    "tg3",
    "bnx2",
    "bnxt_en",
    "be2net",
    "mlx4_en",
    "vmxnet3",
    "hv_netvsc",
    "xen_netfront",
    "8139cp",
    "8139too",
    "ne2k_pci",
    "pcnet32",
    "forcedeth",
    "sky2",
    "atl1c",
    "alx",
)
#: virtio_balloon: a VM partition's memory changes live within its maximum (qrm-qemu's set memory).
VIRTIO_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net", "virtio_balloon")
STORAGE_MODULES: tuple[str, ...] = (
    "ahci",
    "ata_piix",
    "sd_mod",
    "nvme",
    "megaraid_sas",
    "mpt3sas",
    "hpsa",
    "smartpqi",
    "xen_blkfront",
    "hv_storvsc",
    "vmw_pvscsi",
)
#: The NFS client, for network roots (loaded on demand, not by coldplug).
NFS_MODULES: tuple[str, ...] = ("nfsv3", "nfsv4")
#: The iSCSI initiator's kernel side (the SCSI disk driver ``sd_mod`` is in the storage group).
ISCSI_MODULES: tuple[str, ...] = ("iscsi_tcp",)
#: Filesystems a network root is mounted with: ext4 on an iSCSI LUN, overlayfs for a
#: read-only image with a writable layer in RAM (shared pools).
ROOTFS_MODULES: tuple[str, ...] = ("ext4", "overlay")
#: Raw packet sockets for udhcpc, when the kernel builds them as a module.
PACKET_MODULES: tuple[str, ...] = ("af_packet",)

GROUPS: dict[str, tuple[str, ...]] = {
    "nic": NIC_MODULES,
    "virtio": VIRTIO_MODULES,
    "storage": STORAGE_MODULES,
    "nfs": NFS_MODULES,
    "iscsi": ISCSI_MODULES,
    "rootfs": ROOTFS_MODULES,
    "packet": PACKET_MODULES,
}
#: Buses whose device modaliases the agent matches at boot. Other aliases
#: (``crypto-*``, ``fs-*``, ``block-major-*``, CPU features) serve the
#: kernel's own module requests through modprobe, not coldplug.
COLDPLUG_BUSES = frozenset({"pci", "virtio", "vmbus", "xen", "scsi", "acpi", "usb"})
#: Groups that must not come out empty: without a NIC driver nothing boots.
REQUIRED_GROUPS = ("nic",)

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def module_name(path: str) -> str:
    """``kernel/drivers/net/ne2k-pci.ko.xz`` -> ``ne2k_pci`` (the kernel's own normalisation)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def normalise(name: str) -> str:
    if not _MODULE_NAME.match(name):
        raise InvalidInput(f"invalid kernel module name {name!r}")
    return name.replace("-", "_")


@dataclass
class ModuleDb:
    """What ``modules.dep``, ``modules.alias`` and ``modules.softdep`` say about a kernel."""

    paths: dict[str, str] = field(default_factory=dict)  # name -> path relative to modules dir
    deps: dict[str, list[str]] = field(default_factory=dict)  # name -> names (transitive, as listed)
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (pattern, module name)
    softdeps_pre: dict[str, list[str]] = field(default_factory=dict)  # name -> module names or aliases

    @classmethod
    def read(cls, modules_dir: Path) -> ModuleDb:
        db = cls()
        dep_file = modules_dir / "modules.dep"
        try:
            dep_text = dep_file.read_text()
        except OSError as exc:
            raise InvalidInput(f"cannot read {dep_file}: {exc.strerror}") from None
        for lineno, line in enumerate(dep_text.splitlines(), 1):
            if not line.strip():
                continue
            head, sep, tail = line.partition(":")
            if not sep:
                raise InvalidInput(f"{dep_file}:{lineno} is not 'module: dependencies'")
            name = module_name(head.strip())
            db.paths[name] = head.strip()
            db.deps[name] = [module_name(p) for p in tail.split()]
        alias_file = modules_dir / "modules.alias"
        if alias_file.is_file():
            for line in alias_file.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "alias":
                    db.aliases.append((parts[1], parts[2].replace("-", "_")))
        softdep_file = modules_dir / "modules.softdep"
        if softdep_file.is_file():
            for line in softdep_file.read_text().splitlines():
                parts = line.split()
                if len(parts) < 3 or parts[0] != "softdep":
                    continue
                pre: list[str] = []
                section = None
                for word in parts[2:]:
                    if word in ("pre:", "post:"):
                        section = word
                    elif section == "pre:":
                        pre.append(word)
                if pre:
                    db.softdeps_pre.setdefault(parts[1].replace("-", "_"), []).extend(pre)
        for name, listed in db.deps.items():
            unknown = [d for d in listed if d not in db.paths]
            if unknown:
                raise InvalidInput(f"{dep_file}: {name} depends on {unknown[0]}, which it does not list")
        return db

    def resolve(self, name: str) -> list[str]:
        """Module names behind a name or an alias (soft dependencies name aliases)."""
        name = name.replace("-", "_")
        if name in self.paths:
            return [name]
        raw = name.replace("_", "-")
        return sorted(
            {module for pattern, module in self.aliases if pattern in (name, raw)} & set(self.paths)
        )

    def direct_requirements(self, name: str) -> list[str]:
        """What must be loaded before ``name``: its dependencies and its ``pre:`` soft dependencies."""
        required = set(self.deps.get(name, []))
        for soft in self.softdeps_pre.get(name, []):
            required.update(self.resolve(soft))
        required.discard(name)
        return sorted(required)

    def load_order(self, wanted: Iterable[str]) -> list[str]:
        """``wanted`` and everything they need, each after what it needs; deterministic."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(name: str, chain: tuple[str, ...]) -> None:
            mark = state.get(name)
            if mark == 2:
                return
            if mark == 1:
                raise InvalidInput(f"kernel module dependency cycle: {' -> '.join((*chain, name))}")
            state[name] = 1
            for requirement in self.direct_requirements(name):
                visit(requirement, (*chain, name))
            state[name] = 2
            order.append(name)

        for name in wanted:
            visit(name, ())
        return order


@dataclass(frozen=True)
class Selection:
    """The modules of one boot image.

    :ivar order: Every module to ship, in a valid load order.
    :ivar closures: For each shipped module, what to insmod to load it (its
        requirements in order, itself last).
    :ivar groups: Group name -> the requested modules of that group the kernel has.
    :ivar missing: Requested modules this kernel does not have (skipped).
    :ivar aliases: ``(ERE, literal prefix, module)`` for coldplug matching.
    """

    order: list[str]
    closures: dict[str, list[str]]
    groups: dict[str, list[str]]
    missing: list[str]
    aliases: list[tuple[str, str, str]]


def select(
    db: ModuleDb, extra: Iterable[str] = (), groups: dict[str, tuple[str, ...]] | None = None
) -> Selection:
    """Choose the modules of a boot image: every group, plus ``extra`` (which must exist)."""
    groups = GROUPS if groups is None else groups
    found: dict[str, list[str]] = {}
    missing: list[str] = []
    for group, names in groups.items():
        present = []
        for name in names:
            resolved = normalise(name)
            if resolved in db.paths:
                present.append(resolved)
            else:
                missing.append(resolved)
        found[group] = present
    extra_names = [normalise(name) for name in extra]
    unknown = [name for name in extra_names if name not in db.paths]
    if unknown:
        raise InvalidInput(f"the kernel has no module {unknown[0]!r}")
    found["extra"] = extra_names
    empty = [group for group in REQUIRED_GROUPS if group in groups and not found.get(group)]
    if empty:
        raise InvalidInput(
            f"the kernel has none of the {empty[0]} modules qrm needs ({', '.join(groups[empty[0]])})"
        )
    wanted = [name for names in found.values() for name in names]
    order = db.load_order(wanted)
    closures = {name: db.load_order([name]) for name in order}
    shipped = set(order)
    aliases = []
    for pattern, module in db.aliases:
        if module in shipped and pattern.split(":", 1)[0] in COLDPLUG_BUSES and ":" in pattern:
            converted = glob_to_ere(pattern)
            if converted is not None:
                aliases.append((converted, literal_prefix(pattern), module))
    aliases.sort()
    return Selection(
        order=order,
        closures=closures,
        groups=found,
        missing=sorted(set(missing)),
        aliases=aliases,
    )


_ERE_LITERAL = {
    ".": "[.]",
    "+": "[+]",
    "(": "[(]",
    ")": "[)]",
    "{": "[{]",
    "}": "[}]",
    "|": "[|]",
    "$": "[$]",
}


def glob_to_ere(pattern: str) -> str | None:
    """An anchored POSIX ERE equivalent to a modalias glob, or None if the
    pattern holds characters the agent does not match (``^``, ``\\``, whitespace)."""
    if any(ch in pattern for ch in "^\\") or any(ch.isspace() for ch in pattern):
        return None
    out = ["^"]
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                return None
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body + "]")
            i = end
        elif ch in _ERE_LITERAL:
            out.append(_ERE_LITERAL[ch])
        else:
            out.append(ch)
        i += 1
    out.append("$")
    return "".join(out)


def literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard (a cheap pre-filter for the agent)."""
    match = re.match(r"[^*?\[]*", pattern)
    return match.group(0) if match else ""
