"""qrm-xen: Xen hosts through libvirt (libxl), PV and HVM partitions, an xl config file per partition."""

__version__ = "0.1.0"
