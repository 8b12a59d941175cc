"""qrm-ramdisk: virtual environments whose root filesystem is an archive unpacked into RAM.

A ``ramdisk`` storage server is the qrm server itself: each volume is a
``.tar.gz`` root filesystem under ``<data_dir>/ramdisk/<storage>/``, served
over HTTP (``/plugins/ramdisk/<storage>/<volume>``) only to the machines it
is exported to. The node agent in qrm's boot image fetches it into a tmpfs
and switches into it (``qrm.rootfs=<url>`` on the kernel command line).
"""

__version__ = "0.1.0"
