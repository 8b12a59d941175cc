"""qrm-tftpd: the TFTP side of qrm's network boot.

Serves Debian's iPXE and pxelinux boot loaders, the static ``boot.ipxe``, a
per-MAC iPXE script (``ipxe/<mac>.ipxe``) and pxelinux config
(``pxelinux.cfg/01-<mac>``) generated from the qrm database on every request,
and the boot images' kernels and initrds as a TFTP fallback to HTTP. See
``docs/netboot.md`` in the qrm repository for the contract with the DHCP side.

This module stays import-cheap: pluggy imports the plugin module at start-up.
"""

__version__ = "0.1.0"
