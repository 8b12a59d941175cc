"""Boot images built by qrm: a kernel and an initrd holding busybox, drivers and the node agent.

* :mod:`qrm_core.bootimage.kernel`  - where the kernel comes from (``/boot``, a
  Debian package file, ``apt-get download``);
* :mod:`qrm_core.bootimage.modules` - which modules, in which load order;
* :mod:`qrm_core.bootimage.cpio`    - the deterministic initramfs writer;
* :mod:`qrm_core.bootimage.builder` - putting it together;
* ``agent.sh``                      - the node agent, the initrd's ``/init``.

The service that records a built image is
:func:`qrm_core.services.boot_build.create_boot_image`.
"""
