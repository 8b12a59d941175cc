"""iSCSI storage served by tgt (storage type ``iscsi``): LUNs on a target, exported to the
initiator names qrm gives its machines, with a CHAP account per image.

This module is the plugin's ``qrm.plugins`` entry point: every qrm process imports it at
start-up, so it imports nothing heavy; the driver (``qrm_iscsi.driver``) is loaded only
when a storage server of type ``iscsi`` is used. The plugin has no hooks: all it adds is
the storage type.
"""
