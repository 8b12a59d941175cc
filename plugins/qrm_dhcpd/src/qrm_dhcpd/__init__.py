"""qrm-dhcpd: keeps Kea or ISC dhcpd in step with qrm (discovery pool, PXE boot files, one reservation per resource)."""

__version__ = "0.1.0"
