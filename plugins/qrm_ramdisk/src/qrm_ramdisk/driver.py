"""The ``ramdisk`` storage driver: root filesystem archives served by the qrm server.

A ramdisk storage server is the machine ``qrm server`` runs on (its address is
informational). Each volume is ``<root>/<storage>/<volume>.tar.gz``; which
client IPs may fetch it is kept beside it in ``volumes.json`` (under a file
lock, so the CLI and the server agree). Booting machines get
``qrm.rootfs=<base url>/plugins/ramdisk/<storage>/<volume>`` (and
``qrm.rootfs_size=<MB>`` when the volume has a size): the node agent in
qrm's boot image fetches the archive into a tmpfs of that size and switches
into it.

A new volume (``qrm filesystem-image add --size MB``) is a bootable skeleton
root (empty directories: the agent brings busybox); its size is the size of
the RAM filesystem the machine unpacks it into. Real content comes with
``qrm ramdisk import``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qrm_core.plugin_api import (
    DriverError,
    ExportClient,
    InvalidInput,
    NotFound,
    RootSpec,
    StorageDriver,
    StorageTarget,
    VolumeInfo,
)
from qrm_ramdisk.settings import RamdiskSettings, load_settings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATE_FILE = "volumes.json"
SUFFIX = ".tar.gz"
ROUTE_PREFIX = "/plugins/ramdisk"


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or value.endswith(SUFFIX):
        raise InvalidInput(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def normalise_ip(value: str) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 (``::ffff:10.0.0.5``) as IPv4."""
    address = ipaddress.ip_address(value.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class Volumes:
    """The archives and export record of one storage server's directory."""

    def __init__(self, root: Path, storage: str) -> None:
        self.dir = root / check_name(storage, "storage name")

    def archive(self, location: str) -> Path:
        return self.dir / f"{check_name(location, 'volume name')}{SUFFIX}"

    @contextmanager
    def state(self, *, write: bool = True) -> Iterator[dict[str, Any]]:
        """The export record under an exclusive lock (shared when only reading); written back atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / STATE_FILE
        with open(self.dir / (STATE_FILE + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            try:
                try:
                    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
                except (OSError, ValueError) as exc:
                    raise DriverError(f"the ramdisk export record {path} is damaged: {exc}") from None
                volumes = data.setdefault("volumes", {})
                if not isinstance(volumes, dict):
                    raise DriverError(f"the ramdisk export record {path} is damaged: no volume table")
                before = json.dumps(data, sort_keys=True)
                yield volumes
                after = json.dumps(data, sort_keys=True, indent=1)
                if write and after != before:
                    tmp = path.with_name(f".{STATE_FILE}.tmp{os.getpid()}")
                    tmp.write_text(after + "\n")
                    os.replace(tmp, path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def allowed(self, location: str, client_ip: str) -> bool:
        """Whether ``client_ip`` may fetch ``location`` (used by the HTTP route)."""
        try:
            ip = normalise_ip(client_ip)
        except ValueError:
            return False
        with self.state(write=False) as volumes:
            entry = volumes.get(location) or {}
            return ip in entry.get("exports", [])


class RamdiskStorage(StorageDriver):
    """Root filesystem archives that machines unpack into RAM."""

    name = "ramdisk"
    description = "root filesystem archives served by qrm server, unpacked into RAM by the node agent"
    copies_per_machine = True  # each machine unpacks the archive: VEs may share it

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self._ramdisk: RamdiskSettings | None = None

    @property
    def ramdisk(self) -> RamdiskSettings:
        if self._ramdisk is None:
            self._ramdisk = load_settings()
        return self._ramdisk

    def volumes(self, storage: StorageTarget) -> Volumes:
        return Volumes(self.ramdisk.effective_root(self.settings), storage.name)

    # -- validation -------------------------------------------------------

    def validate_server(self, storage: StorageTarget) -> None:
        check_name(storage.name, "storage name")
        try:
            ipaddress.ip_address(storage.address)
        except ValueError:
            raise InvalidInput(
                f"storage address {storage.address!r} is not an IP address (a ramdisk storage server "
                "is the machine qrm server runs on)"
            ) from None

    def validate_location(self, storage: StorageTarget, location: str) -> None:
        check_name(location, "volume name")

    # -- volumes ----------------------------------------------------------

    def create_volume(self, storage: StorageTarget, name: str, size_mb: int) -> VolumeInfo:
        from qrm_ramdisk.archive import create_skeleton

        if size_mb <= 0:
            raise InvalidInput("volume size must be positive")
        volumes = self.volumes(storage)
        archive = volumes.archive(name)
        with volumes.state() as state:
            if archive.exists() or name in state:
                raise DriverError(f"volume {name} already exists on {storage.name}")
            create_skeleton(archive, hostname=name)
            state[name] = {"size_mb": size_mb, "exports": [], "origin": "skeleton"}
        return VolumeInfo(location=name, size_mb=size_mb)

    def import_volume(
        self, storage: StorageTarget, name: str, source: Path, size_mb: int | None = None
    ) -> VolumeInfo:
        """Make volume ``name`` from a directory or a tar archive (``qrm ramdisk import``)."""
        from qrm_ramdisk.archive import create_archive

        if size_mb is not None and size_mb <= 0:
            raise InvalidInput("volume size must be positive")
        volumes = self.volumes(storage)
        archive = volumes.archive(name)
        if archive.exists():
            raise DriverError(f"volume {name} already exists on {storage.name}")
        # Build beside the final name, outside the lock (a big tree takes a while).
        building = archive.with_name(f".{archive.name}.import{os.getpid()}")
        try:
            create_archive(source, building)
            with volumes.state() as state:
                if archive.exists() or name in state:
                    raise DriverError(f"volume {name} already exists on {storage.name}")
                os.replace(building, archive)
                state[name] = {"size_mb": size_mb, "exports": [], "origin": "imported"}
        finally:
            building.unlink(missing_ok=True)
        return VolumeInfo(location=name, size_mb=size_mb)

    def remove_volume(self, storage: StorageTarget, location: str) -> None:
        volumes = self.volumes(storage)
        archive = volumes.archive(location)
        with volumes.state() as state:
            entry = state.get(location)
            if entry is None and not archive.exists():
                raise NotFound(f"volume {location} does not exist on {storage.name}")
            if entry and entry.get("exports"):
                raise DriverError(f"volume {location} is still exported to {', '.join(entry['exports'])}")
            archive.unlink(missing_ok=True)
            state.pop(location, None)

    def list_volumes(self, storage: StorageTarget) -> list[VolumeInfo]:
        volumes = self.volumes(storage)
        with volumes.state(write=False) as state:
            names = {
                p.name[: -len(SUFFIX)]
                for p in volumes.dir.glob(f"*{SUFFIX}")
                if NAME_RE.match(p.name[: -len(SUFFIX)])
            }
            result = []
            for name in sorted(names):
                entry = state.get(name) or {}
                size = entry.get("size_mb")
                if size is None:
                    size = -(-volumes.archive(name).stat().st_size // (1 << 20))
                result.append(
                    VolumeInfo(location=name, size_mb=size, exported_to=tuple(entry.get("exports", [])))
                )
            return result

    # -- exports ----------------------------------------------------------

    def export_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        if not client.ip:
            raise InvalidInput(f"cannot export {location} to {client.mac}: it has no IP address")
        ip = normalise_ip(client.ip)
        volumes = self.volumes(storage)
        with volumes.state() as state:
            if not volumes.archive(location).exists():
                raise DriverError(
                    f"volume {location} has no archive on {storage.name}; create it with "
                    "'qrm ramdisk import' or 'qrm filesystem-image add --size'"
                )
            entry = state.setdefault(location, {"size_mb": None, "exports": [], "origin": "adopted"})
            if ip not in entry["exports"]:
                entry["exports"] = sorted([*entry["exports"], ip])

    def unexport_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        if not client.ip:
            return
        ip = normalise_ip(client.ip)
        volumes = self.volumes(storage)
        with volumes.state() as state:
            entry = state.get(location)
            if entry and ip in entry.get("exports", []):
                entry["exports"] = [e for e in entry["exports"] if e != ip]

    # -- booting ----------------------------------------------------------

    def describe_root(
        self,
        storage: StorageTarget,
        location: str,
        client: ExportClient | None = None,
        *,
        shared: bool = False,
    ) -> RootSpec:
        check_name(location, "volume name")
        base = self.ramdisk.effective_base_url(self.settings)
        if base is None:
            raise DriverError(
                "the ramdisk storage needs to know how machines reach qrm server: set QRM_SERVER_URL "
                "(or QRM_RAMDISK_BASE_URL), e.g. http://10.0.0.1:8080"
            )
        url = f"{base}{ROUTE_PREFIX}/{check_name(storage.name, 'storage name')}/{location}"
        args = [f"qrm.rootfs={url}"]
        volumes = self.volumes(storage)
        with volumes.state(write=False) as state:
            size = (state.get(location) or {}).get("size_mb")
        if isinstance(size, int) and size > 0:
            args.append(f"qrm.rootfs_size={size}")
        return RootSpec(
            kernel_args=tuple(args),
            description=f"ramdisk {storage.name}/{location}" + (f" ({size} MB in RAM)" if size else ""),
        )
