"""qrm-vmware: ESXi hosts and vCenter as hosts of qrm partitions (VMs that network-boot), through pyVmomi."""

__version__ = "0.1.0"
