"""The netboot contract with the TFTP service (docs/netboot.md), in one place.

A PXE client gets ``next-server`` = the TFTP server and a boot file chosen by
what it is:

* already iPXE (user-class ``iPXE``, or it sent option 175): ``boot.ipxe``;
* legacy BIOS PXE (client architecture 0, or none given): ``undionly.kpxe``;
* UEFI x86-64 (architecture 7 or 9): ``ipxe.efi``;
* with ``boot_loader = "pxelinux"``: ``pxelinux.0`` for every PXE client.

iPXE clients also get option 175.176 (no-pxedhcp) = 1, so iPXE does not wait
about three seconds for proxy-DHCP offers that never come.

Clients of other architectures (ARM, 32-bit UEFI) get the next-server but no
boot file: no loader for them is shipped.
"""

from __future__ import annotations

IPXE_SCRIPT = "boot.ipxe"
BIOS_LOADER = "undionly.kpxe"
EFI64_LOADER = "ipxe.efi"
PXELINUX = "pxelinux.0"

#: Option 175: iPXE's encapsulated options; 176 inside it: no-pxedhcp.
IPXE_ENCAP_CODE = 175
IPXE_NO_PXEDHCP_CODE = 176

#: Client system architectures (option 93, RFC 4578).
ARCH_BIOS = 0
ARCH_EFI64 = (7, 9)
