"""The lab: a data center in a box (simulated agents now; QEMU machines with the network-boot plugins)."""
