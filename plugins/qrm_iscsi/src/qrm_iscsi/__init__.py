"""qrm-iscsi: the ``iscsi`` storage type, filesystem images as LUNs on a tgt target."""
