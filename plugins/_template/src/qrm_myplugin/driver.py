"""TODO: the plugin's driver, if it has one (docs/drivers.md has the contract).

stevedore imports this module only when core needs the driver by name (a
storage server of type ``myplugin``), so this is where heavy imports go::

    import libvirt          # an SDK that is slow to import or may be missing

Register the class in pyproject.toml under ``qrm.storage`` (or
``qrm.hypervisors``, subclassing HypervisorDriver instead) once it works.
Every method that changes something calls its ``validate_*`` first; raise
InvalidInput for arguments the backend cannot take, NotFound for a missing
volume, DriverError when the backend refuses or fails. One-line messages.
"""

from __future__ import annotations

from qrm_core.plugin_api import DriverError, ExportClient, RootSpec, StorageDriver, StorageTarget, VolumeInfo


class MyPluginStorage(StorageDriver):
    name = "myplugin"
    description = "TODO one line for qrm plugins list"

    def detect_missing_dependencies(self) -> list[str]:
        # e.g. return ["the 'foo' command (apt-get install foo)"] if shutil.which("foo") is None else []
        return []

    def validate_server(self, storage: StorageTarget) -> None:
        pass  # TODO: check storage.address / storage.comment; no I/O

    def validate_location(self, storage: StorageTarget, location: str) -> None:
        pass  # TODO: check the location syntax strictly; no I/O

    def create_volume(self, storage: StorageTarget, name: str, size_mb: int) -> VolumeInfo:
        raise DriverError("myplugin: create_volume is not implemented yet")

    def remove_volume(self, storage: StorageTarget, location: str) -> None:
        raise DriverError("myplugin: remove_volume is not implemented yet")

    def export_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        raise DriverError("myplugin: export_volume is not implemented yet")

    def unexport_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        raise DriverError("myplugin: unexport_volume is not implemented yet")

    def describe_root(
        self,
        storage: StorageTarget,
        location: str,
        client: ExportClient | None = None,
        *,
        shared: bool = False,
    ) -> RootSpec:
        raise DriverError("myplugin: describe_root is not implemented yet")
