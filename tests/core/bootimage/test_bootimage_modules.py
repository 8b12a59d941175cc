"""Module selection and load order: from modules.dep, modules.softdep and modules.alias."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qrm_core.bootimage.kernel import KernelTree
from qrm_core.bootimage.modules import ModuleDb, glob_to_ere, literal_prefix, module_name, select
from qrm_core.errors import InvalidInput

DEP = """\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/ethernet/realtek/r8169.ko.xz: kernel/drivers/net/phy/libphy.ko
kernel/drivers/net/phy/libphy.ko:
kernel/drivers/net/phy/realtek.ko: kernel/drivers/net/phy/libphy.ko
kernel/drivers/net/ne2k-pci.ko: kernel/drivers/net/8390.ko
kernel/drivers/net/8390.ko:
"""
ALIAS = """\
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000001v* virtio_net
alias pci:v000010ECd00008168sv*sd*bc*sc*i* r8169
alias crypto-crc32c r8169
alias phy-realtek realtek
"""
SOFTDEP = "softdep r8169 pre: phy-realtek\n"


def write_db(tmp_path: Path, dep: str = DEP) -> Path:
    (tmp_path / "modules.dep").write_text(dep)
    (tmp_path / "modules.alias").write_text(ALIAS)
    (tmp_path / "modules.softdep").write_text(SOFTDEP)
    return tmp_path


def test_names_are_normalised() -> None:
    assert module_name("kernel/drivers/net/ne2k-pci.ko.xz") == "ne2k_pci"
    assert module_name("a/virtio_net.ko") == "virtio_net"


def test_load_order_puts_every_dependency_first(tmp_path: Path) -> None:
    db = ModuleDb.read(write_db(tmp_path))
    order = db.load_order(["virtio_net"])
    assert order[-1] == "virtio_net" and set(order) == {
        "virtio_net",
        "net_failover",
        "failover",
        "virtio",
        "virtio_ring",
    }
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_net")
    assert order.index("failover") < order.index("net_failover")
    assert db.load_order(["virtio_net"]) == order  # deterministic


def test_soft_dependencies_through_aliases_load_first(tmp_path: Path) -> None:
    db = ModuleDb.read(write_db(tmp_path))
    assert db.load_order(["r8169"]) == ["libphy", "realtek", "r8169"]


def test_selection_skips_what_the_kernel_lacks_but_not_extras(tmp_path: Path) -> None:
    db = ModuleDb.read(write_db(tmp_path))
    chosen = select(db, groups={"nic": ("virtio_net", "e1000", "ne2k-pci")})
    assert chosen.groups["nic"] == ["virtio_net", "ne2k_pci"]
    assert chosen.missing == ["e1000"]
    assert chosen.closures["ne2k_pci"] == ["8390", "ne2k_pci"]
    with pytest.raises(InvalidInput, match="no module 'bnx2'"):
        select(db, ["bnx2"], groups={"nic": ("virtio_net",)})
    with pytest.raises(InvalidInput, match="none of the nic modules"):
        select(db, groups={"nic": ("e1000",)})
    with pytest.raises(InvalidInput, match="invalid kernel module name"):
        select(db, ["../../etc/passwd"], groups={"nic": ("virtio_net",)})


def test_only_device_aliases_are_kept_for_coldplug(tmp_path: Path) -> None:
    db = ModuleDb.read(write_db(tmp_path))
    chosen = select(db, groups={"nic": ("virtio_net", "r8169")})
    modules = {module for _, _, module in chosen.aliases}
    assert modules == {"virtio_net", "r8169"}  # crypto-crc32c is a modprobe alias, not a device
    assert all(ere.startswith("^") and ere.endswith("$") for ere, _, _ in chosen.aliases)


def test_cycles_and_broken_files_are_one_line_errors(tmp_path: Path) -> None:
    cyclic = "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n"
    db = ModuleDb.read(write_db(tmp_path, cyclic))
    with pytest.raises(InvalidInput, match="cycle"):
        db.load_order(["a"])
    with pytest.raises(InvalidInput, match="does not list"):
        ModuleDb.read(write_db(tmp_path, "kernel/a.ko: kernel/zz.ko\n"))
    with pytest.raises(InvalidInput, match="not 'module: dependencies'"):
        ModuleDb.read(write_db(tmp_path, "garbage line\n"))
    with pytest.raises(InvalidInput, match="cannot read"):
        ModuleDb.read(tmp_path / "nowhere")


ALIASES = [
    ("pci:v00008086d0000100Esv*sd*bc*sc*i*", "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00", True),
    ("pci:v00008086d0000100Esv*sd*bc*sc*i*", "pci:v00008086d0000100Fsv00001AF4sd00001100bc02sc00i00", False),
    ("pci:v*d*sv*sd*bc01sc06i01*", "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01", True),
    ("virtio:d00000001v*", "virtio:d00000001v00001AF4", True),
    ("virtio:d00000001v*", "virtio:d00000002v00001AF4", False),
    ("acpi*:PNP0A0[38]:*", "acpi:PNP0A08:", True),
    ("acpi*:PNP0A0[38]:*", "acpi:PNP0A05:", False),
    ("scsi:t-0x0[!5]*", "scsi:t-0x00", True),
    ("scsi:t-0x0[!5]*", "scsi:t-0x05", False),
    ("of:N*T*Cfoo.bar(x)+y?", "of:NaTbCfoo.bar(x)+yz", True),
    ("of:N*T*Cfoo.bar(x)+y?", "of:NaTbCfooXbar(x)+yz", False),
]


def test_glob_to_ere_matches_like_the_glob_in_busybox_awk() -> None:
    """The converted patterns are checked by the awk the agent runs (busybox)."""
    program = '{ if ($2 ~ $1) print "yes"; else print "no" }'
    lines = "\n".join(f"{glob_to_ere(glob)} {alias}" for glob, alias, _ in ALIASES) + "\n"
    done = subprocess.run(
        ["/bin/busybox", "awk", program], input=lines, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["yes" if expected else "no" for _, _, expected in ALIASES]
    assert glob_to_ere("a^b") is None and glob_to_ere("a b") is None
    assert literal_prefix("pci:v00008086d0000100Esv*") == "pci:v00008086d0000100Esv"


def test_real_kernel_virtio_net_order(kernel_tree: KernelTree) -> None:
    """Debian's kernel: the 8 modules behind virtio-net, in an order modules.dep allows."""
    db = ModuleDb.read(kernel_tree.modules_dir)
    order = db.load_order(["virtio_pci", "virtio_net"])
    assert set(order) == {
        "virtio_ring",
        "virtio",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "failover",
        "net_failover",
        "virtio_net",
    }
    for name in order:
        for dep in db.deps[name]:
            assert order.index(dep) < order.index(name), (dep, name)
    assert db.load_order(["r8169"])[:-1].count("realtek") == 1  # the PHY driver of its softdep
