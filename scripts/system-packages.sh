#!/usr/bin/env bash
# Debian 12 packages qrm and its test suite use. Run as root (the README's
# commands call it when they run as root). Safe to run again.
#   scripts/system-packages.sh run    # what running qrm needs
#   scripts/system-packages.sh test   # what the whole test suite needs
set -euo pipefail
what=${1:-test}
run_pkgs=(python3 python3-venv python3-dev gcc ipxe pxelinux syslinux-common busybox-static kmod)
test_pkgs=(
  "${run_pkgs[@]}"
  iproute2 procps curl
  # qrm_nfs: nfs-ganesha (VFS) with rpcbind in a netns; libnfs + showmount as clients
  nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils nfs-common
  # qrm_nfs server=kernel: exportfs checks qrm's exports file (no nfsd needed; installs without
  # systemd, its service is simply not started)
  nfs-kernel-server
  # qrm_dhcpd: Kea (kea-admin creates its hosts-database schema), ISC dhcpd; busybox udhcpc is the client
  kea-dhcp4-server kea-admin isc-dhcp-server busybox-static
  # qrm_tftpd: boot loaders it serves; tftpd-hpa/tftp-hpa/curl for clients and the benchmark;
  # QEMU runs Debian's iPXE and pxelinux against it in a netns
  ipxe pxelinux syslinux-common tftpd-hpa tftp-hpa qemu-system-x86
  # boot images (qrm_core.bootimage): busybox-static goes into the initrd, kmod's depmod orders modules,
  # cpio checks the archive; QEMU (with ipxe-qemu's virtio-net ROM) boots it; dash checks the agent's syntax
  busybox-static kmod cpio qemu-system-x86 ipxe-qemu dash
  # network roots: open-iscsi's iscsistart goes into the initrd; the test storage host runs
  # nfs-ganesha, tgt and sshd in a namespace (qrm_core.testkit.StorageHost); libiscsi-bin and
  # qemu-block-extra are second iSCSI clients from the host; lvm2 for LUNs on logical volumes
  open-iscsi tgt openssh-server openssh-client libiscsi-bin qemu-block-extra lvm2 e2fsprogs util-linux
  # filesystem images (issue 12): rsync captures a running machine over ssh; xfsprogs makes the
  # loop-mounted XFS (reflink) on which copy-on-write snapshots are tested; zstd, xz-utils for archives;
  # openssl hashes the test root password of tests/core/test_capture_password.py (openssl passwd -6)
  rsync xfsprogs zstd xz-utils openssl
  # qrm lab and tests/integration/test_lab_e2e.py: QEMU machines PXE-booting through Kea or ISC dhcpd
  # and qrm-tftpd into the node agent (a Debian kernel package is fetched with apt-get download);
  # UEFI machines (qrm lab up --firmware uefi) run OVMF and get ipxe.efi from ipxe
  qemu-system-x86 ipxe-qemu kea-dhcp4-server isc-dhcp-server busybox-static kmod curl tftpd-hpa ovmf ipxe
  # qrm_libvirt, qrm_qemu, qrm_xen: libvirt-python builds against libvirt-dev (no wheel exists); private
  # libvirtds (qrm_core.lab.libvirtd) run QEMU guests for the real-QEMU tests and the lab's hypervisor
  # host; virsh shows libvirt's own view in tests; libvirt0 (with libvirt-dev) ships the RelaxNG schemas
  # the domain XML is validated with; libxenmisc4.17 is Xen's config parser (libxlutil) that checks the
  # xl config files (Xen itself cannot run here); libvirt-daemon-system creates the libvirt-qemu user a
  # root libvirtd looks up at start even when its qemu.conf runs guests as root (it starts nothing here)
  libvirt-dev pkg-config libvirt-daemon libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 util-linux
  libxenmisc4.17
  # the web console's browser tests (tests/console): Playwright drives Debian's Chromium
  chromium fonts-dejavu-core
  # qrm_vmware: its tests build vcsim (the vSphere API simulator) offline from Debian's govmomi
  # simulator sources with the Go compiler (plugins/qrm_vmware/tests/vcsim/vcsimbuild.py)
  golang-go golang-github-vmware-govmomi-dev
  # qrm_nagios: a private Nagios 4 (nagios4 -v checks every configuration) and the plugins it runs
  nagios4-core monitoring-plugins-basic
)
case "$what" in
  run) pkgs=("${run_pkgs[@]}") ;;
  test) pkgs=("${test_pkgs[@]}") ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "qrm needs these Debian packages: ${missing[*]}" >&2
  echo "install them as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
