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
  # qrm_dhcpd: Kea (kea-admin creates its hosts-database schema), ISC dhcpd; busybox udhcpc is the client
  kea-dhcp4-server kea-admin isc-dhcp-server busybox-static
  # qrm_tftpd: boot loaders it serves; tftpd-hpa/tftp-hpa/curl for clients and the benchmark;
  # QEMU runs Debian's iPXE and pxelinux against it in a netns
  ipxe pxelinux syslinux-common tftpd-hpa tftp-hpa qemu-system-x86
  # boot images (qrm_core.bootimage): busybox-static goes into the initrd, kmod's depmod orders modules,
  # cpio checks the archive; QEMU (with ipxe-qemu's virtio-net ROM) boots it; dash checks the agent's syntax
  busybox-static kmod cpio qemu-system-x86 ipxe-qemu dash
  # qrm lab and tests/integration/test_lab_e2e.py: QEMU machines PXE-booting through Kea or ISC dhcpd
  # and qrm-tftpd into the node agent (a Debian kernel package is fetched with apt-get download);
  # UEFI machines (qrm lab up --firmware uefi) run OVMF and get ipxe.efi from ipxe
  qemu-system-x86 ipxe-qemu kea-dhcp4-server isc-dhcp-server busybox-static kmod curl tftpd-hpa ovmf ipxe
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
