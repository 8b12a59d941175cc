"""qrm NFS storage: volumes are directories under an export root, exported to
the machines that boot from them by nfs-ganesha (see README.md)."""

__version__ = "0.1.0"
