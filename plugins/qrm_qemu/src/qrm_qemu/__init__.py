"""qrm-qemu: QEMU/KVM hosts through libvirt; partitions that network-boot into qrm."""

__version__ = "0.1.0"
