"""Building boot images from a real Debian kernel package: reproducible, complete, checked.

Uses the kernel package the session fixture downloads once (conftest.py).
"""

from __future__ import annotations

import gzip
import stat
import subprocess
from pathlib import Path

import pytest

from qrm_core.bootimage import builder
from qrm_core.bootimage import kernel as kernels
from qrm_core.bootimage.cpio import read_newc
from qrm_core.bootimage.modules import ModuleDb
from qrm_core.errors import InvalidInput


def members(result: builder.BuildResult) -> dict[str, tuple[int, bytes]]:
    return {name: (mode, data) for name, mode, data in read_newc(gzip.decompress(result.initrd.read_bytes()))}


def test_same_inputs_give_the_same_bytes(kernel_tree: kernels.KernelTree, tmp_path: Path) -> None:
    first = builder.build_initrd(kernel_tree, tmp_path / "a", work_dir=tmp_path / "wa")
    second = builder.build_initrd(kernel_tree, tmp_path / "b", work_dir=tmp_path / "wb")
    assert first.initrd_sha256 == second.initrd_sha256
    assert first.initrd.read_bytes() == second.initrd.read_bytes()
    assert first.kernel_sha256 == second.kernel_sha256
    # One input changed (the agent, or the module selection): different bytes.
    agent = builder.agent_script() + b"\n# local change\n"
    third = builder.build_initrd(kernel_tree, tmp_path / "c", work_dir=tmp_path / "wc", agent=agent)
    assert third.initrd_sha256 != first.initrd_sha256
    fourth = builder.build_initrd(
        kernel_tree, tmp_path / "d", work_dir=tmp_path / "wd", extra_modules=["bnx2x"]
    )
    assert fourth.initrd_sha256 != first.initrd_sha256 and "bnx2x" in fourth.modules


def test_the_initrd_holds_agent_busybox_and_ordered_modules(boot_image: builder.BuildResult) -> None:
    files = members(boot_image)
    mode, init = files["init"]
    assert init == builder.agent_script() and stat.S_IMODE(mode) == 0o755
    assert files["bin/busybox"][0] & 0o111
    sh_mode, sh_target = files["bin/sh"]
    assert stat.S_ISLNK(sh_mode) and sh_target == b"/bin/busybox"
    for applet in ("sbin/udhcpc", "usr/bin/wget", "sbin/switch_root", "sbin/insmod", "usr/bin/awk"):
        assert files[applet][1] == b"/bin/busybox", applet
    console_mode, _ = files["dev/console"]
    assert stat.S_ISCHR(console_mode)
    release = files["etc/qrm/release"][1].decode()
    assert f"kernel={boot_image.kernel_version}" in release

    # Every NIC/virtio/storage module the kernel has, with what it needs, in modules.dep order.
    assert {"virtio_net", "virtio_pci", "e1000", "e1000e", "igb", "r8169", "ahci", "nvme", "sd_mod"} <= set(
        boot_image.modules
    )
    assert {"nfsv3", "nfsv4"} <= set(boot_image.modules)
    load = {
        line.split()[0]: line.split()[1:] for line in files["etc/qrm/modules.load"][1].decode().splitlines()
    }
    module_root = f"lib/modules/{boot_image.kernel_version}"
    for name in boot_image.modules:
        paths = load[name]
        assert paths[-1].rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_") == name
        for path in paths:
            data = files[f"{module_root}/{path}"][1]
            assert data[:4] == b"\x7fELF", path  # shipped uncompressed
    virtio = [p.rsplit("/", 1)[-1] for p in load["virtio_net"]]
    assert virtio.index("virtio_ring.ko") < virtio.index("virtio.ko") < virtio.index("virtio_net.ko")
    assert virtio.index("failover.ko") < virtio.index("net_failover.ko") < virtio.index("virtio_net.ko")
    r8169 = [p.rsplit("/", 1)[-1] for p in load["r8169"]]
    assert r8169.index("realtek.ko") < r8169.index("r8169.ko")  # its PHY driver (softdep) first
    # The subset modules.dep that busybox modprobe (and the kernel's module requests) use.
    modprobe_dep = files[f"{module_root}/modules.dep"][1].decode()
    assert any(line.startswith("kernel/drivers/net/virtio_net.ko:") for line in modprobe_dep.splitlines())
    nic = files["etc/qrm/modules.nic"][1].decode().split()
    assert nic[0] == "virtio_net" and "e1000" in nic and "ahci" not in nic


def test_network_roots_have_their_modules_and_initiator(
    boot_image: builder.BuildResult, kernel_tree: kernels.KernelTree, tmp_path: Path
) -> None:
    """NFS and iSCSI clients, ext4 and overlayfs for network roots; open-iscsi's
    iscsistart with every library its loader needs (where the build host has it)."""
    files = members(boot_image)
    assert {"nfsv3", "nfsv4", "iscsi_tcp", "libiscsi", "scsi_transport_iscsi", "ext4", "overlay"} <= set(
        boot_image.modules
    )
    load = {
        line.split()[0]: line.split()[1:] for line in files["etc/qrm/modules.load"][1].decode().splitlines()
    }
    ext4 = [p.rsplit("/", 1)[-1] for p in load["ext4"]]
    assert ext4.index("jbd2.ko") < ext4.index("ext4.ko") and "crc32c_generic.ko" in ext4  # a softdep
    if not Path("/usr/sbin/iscsistart").is_file():
        pytest.skip(
            "open-iscsi is not installed here: the image has no iSCSI initiator (apt-get install open-iscsi)"
        )
    assert boot_image.iscsi_initiator == "/usr/sbin/iscsistart"
    assert files["usr/sbin/iscsistart"][1] == Path("/usr/sbin/iscsistart").read_bytes()
    assert "iscsi=/usr/sbin/iscsistart" in files["etc/qrm/release"][1].decode()
    for library in builder.shared_libraries(Path("/usr/sbin/iscsistart")):
        assert files[library.lstrip("/")][1][:4] == b"\x7fELF", library
    assert any(p.startswith("lib64/ld-linux") for p in files)
    # Without it: no initiator, and the release file says so.
    bare = builder.build_initrd(kernel_tree, tmp_path / "o", work_dir=tmp_path / "w", iscsistart=None)
    assert bare.iscsi_initiator is None
    bare_files = members(bare)
    assert "usr/sbin/iscsistart" not in bare_files and "iscsi=\n" in bare_files["etc/qrm/release"][1].decode()


def test_busybox_modprobe_agrees_with_the_order(boot_image: builder.BuildResult, tmp_path: Path) -> None:
    """The real module tools read the shipped tree: depmod accepts it and the
    dependencies it computes match modules.load."""
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"],
        input=gzip.decompress(boot_image.initrd.read_bytes()),
        cwd=root,
        check=True,
        capture_output=True,
    )
    kver = boot_image.kernel_version
    subprocess.run(["depmod", "-b", str(root), kver], check=True, capture_output=True)
    db = ModuleDb.read(root / "lib" / "modules" / kver)
    load = {
        line.split()[0]: line.split()[1:] for line in (root / "etc/qrm/modules.load").read_text().splitlines()
    }
    for name, paths in load.items():
        position = {
            path.rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_"): i for i, path in enumerate(paths)
        }
        for dep in db.deps[name]:
            assert position[dep] < position[name], (name, dep)


def test_kernel_sources_fail_with_one_line(kernel_deb: Path, kernel_version: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as wrong:
        kernels.from_deb(kernel_deb, "5.10.0-99-amd64", tmp_path)
    assert f"not 5.10.0-99-amd64 (give -k {kernel_version})" in wrong.value.message
    junk = tmp_path / "junk.deb"
    junk.write_bytes(b"this is not a package")
    with pytest.raises(InvalidInput, match="is not a Debian package"):
        kernels.from_deb(junk, kernel_version, tmp_path)
    with pytest.raises(InvalidInput, match="is not a file"):
        kernels.from_deb(tmp_path / "missing.deb", kernel_version, tmp_path)
    with pytest.raises(InvalidInput, match=r"there is no .*vmlinuz-9\.9\.9.*--kernel-deb"):
        kernels.from_boot("9.9.9", boot_dir=tmp_path, modules_root=tmp_path)
    with pytest.raises(InvalidInput, match="--kernel-deb or --download, not both"):
        builder.resolve_kernel(kernel_version, work_dir=tmp_path, kernel_deb=kernel_deb, download=True)
    for message in (wrong.value.message,):
        assert "\n" not in message


def test_a_kernel_in_boot_is_found(kernel_tree: kernels.KernelTree, tmp_path: Path) -> None:
    """The /boot + /lib/modules layout of an installed kernel (here: a copy of the package's)."""
    boot, modules = tmp_path / "boot", tmp_path / "lib" / "modules"
    boot.mkdir()
    modules.mkdir(parents=True)
    (boot / f"vmlinuz-{kernel_tree.version}").symlink_to(kernel_tree.vmlinuz)
    (modules / kernel_tree.version).symlink_to(kernel_tree.modules_dir)
    assert kernels.boot_kernel_versions(boot, modules) == [kernel_tree.version]
    tree = kernels.from_boot(kernel_tree.version, boot_dir=boot, modules_root=modules)
    assert not tree.owned and tree.modules_dir == modules / kernel_tree.version


def test_busybox_must_be_static(kernel_tree: kernels.KernelTree, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a statically linked busybox"):
        builder.build_initrd(kernel_tree, tmp_path / "o", work_dir=tmp_path, busybox=Path("/bin/ls"))
    with pytest.raises(InvalidInput, match="busybox-static"):
        builder.build_initrd(kernel_tree, tmp_path / "o", work_dir=tmp_path, busybox=tmp_path / "nope")


def test_progress_is_reported(kernel_tree: kernels.KernelTree, tmp_path: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    builder.build_initrd(kernel_tree, tmp_path / "o", work_dir=tmp_path, progress=lambda *a: seen.append(a))
    assert seen[-1] == ("done", builder.PROGRESS_TOTAL, builder.PROGRESS_TOTAL)
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and len(seen) > 20
    assert any(what.startswith("compressing") for what, _, _ in seen)


def test_download_of_an_unknown_kernel_is_one_line(tmp_path: Path) -> None:
    """apt-get itself answers (no package is fetched)."""
    with pytest.raises(InvalidInput) as unknown:
        kernels.download_deb("0.0.0-99-nonexistent", tmp_path / "cache")
    assert "apt knows no package linux-image-0.0.0-99-nonexistent" in unknown.value.message
    assert "\n" not in unknown.value.message
    assert not list((tmp_path / "cache").glob("*.deb"))
