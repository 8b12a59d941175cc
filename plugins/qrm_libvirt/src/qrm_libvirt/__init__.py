"""qrm-libvirt: the libvirt layer the qemu and xen hypervisor plugins share.

A library with no entry points (``qrm plugins list`` does not show it): both
plugins depend on it and subclass its driver, so each piece exists once.

* :mod:`qrm_libvirt.binding` - libvirt-python, imported on first use only;
* :mod:`qrm_libvirt.connections` - one connection per host URI and process,
  with keepalive and reconnect;
* :mod:`qrm_libvirt.events` - libvirt's event loop thread and what lifecycle
  events mean for a partition;
* :mod:`qrm_libvirt.domxml` - domain XML built as a tree and read back;
* :mod:`qrm_libvirt.errors` - libvirt's errors as one-line qrm errors;
* :mod:`qrm_libvirt.migration` - live and offline migration (and its seam);
* :mod:`qrm_libvirt.driver` - :class:`~qrm_libvirt.driver.LibvirtHypervisor`;
* :mod:`qrm_libvirt.watcher` - the background service that follows lifecycle
  events into qrm's database;
* :mod:`qrm_libvirt.testing` - test helpers (private libvirt daemons, test
  driver hosts, RelaxNG validation).

Importing this package (or any module but the ones that talk to a host) does
not import libvirt.
"""

__version__ = "0.1.0"
