"""The ``nfs`` storage driver: volumes are directories, exports are nfs-ganesha EXPORT blocks.

Management model (openQRM's NFS storage, with nfs-ganesha as the server):
the driver manages an export configuration on the host where qrm runs. The
storage server is this host, or a host that shares this configuration; a
remote storage host reached over SSH is not supported yet. Every ``nfs``
storage server in qrm therefore refers to the same export root and the same
ganesha.

* A volume is ``<export_root>/<name>``. Existing directories there can be
  imported as filesystem images.
* The driver's record of exports (``<export_root>/.qrm-nfs.json``: each
  volume's stable Export_Id and its clients) is the source of truth. Every
  change regenerates the whole EXPORT file from it, proves the result (see
  :mod:`qrm_nfs.ganesha`), renames it into place and reloads ganesha.
* All of that happens under one file lock (``<export_root>/.qrm-nfs.lock``),
  so the CLI, ``qrm server`` and several servers on one host serialise.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qrm_core.drivers.base import ExportClient, RootSpec, StorageDriver, StorageTarget, VolumeInfo
from qrm_core.errors import DriverError, InvalidInput, NotFound
from qrm_nfs import ganesha
from qrm_nfs.settings import NfsSettings, load_settings

log = logging.getLogger("qrm.plugins.nfs")

VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
STATE_FILE = ".qrm-nfs.json"
LOCK_FILE = ".qrm-nfs.lock"
FSAL_VFS = Path("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so")


def check_location_syntax(location: str) -> str:
    """An absolute path of safe characters: no ``..``, no hidden parts, no quoting needed."""
    if not isinstance(location, str) or not location.startswith("/") or len(location) > 1024:
        raise InvalidInput(f"NFS location {location!r} must be an absolute path (e.g. /srv/qrm/nfs/web)")
    parts = location.split("/")[1:]
    if location == "/" or any(not _COMPONENT.match(part) for part in parts):
        raise InvalidInput(
            f"NFS location {location!r} may only hold letters, digits, '.', '_', '-' and '/', "
            "with no empty, '.' or '..' parts and no part starting with '.' or '-'"
        )
    return location


def check_ipv4_server(address: str) -> ipaddress.IPv4Address:
    """A storage address a booting machine can mount its root from."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidInput(f"NFS storage address {address!r} is not an IP address") from None
    if not isinstance(ip, ipaddress.IPv4Address):
        raise InvalidInput(
            f"NFS storage address {address} must be IPv4: the nfsroot boot path "
            "(kernel and initramfs nfsmount) cannot mount from IPv6"
        )
    if (
        ip.is_unspecified
        or ip.is_loopback
        or ip.is_multicast
        or ip == ipaddress.IPv4Address("255.255.255.255")
    ):
        raise InvalidInput(f"NFS storage address {address} cannot be reached by booting machines")
    return ip


def check_client_ip(client: ExportClient, location: str) -> str:
    if not client.ip:
        raise InvalidInput(f"cannot export {location} to {client.mac}: the machine has no IP address")
    try:
        ip = ipaddress.ip_address(client.ip)
    except ValueError:
        raise InvalidInput(f"cannot export {location} to {client.ip!r}: not an IP address") from None
    if not isinstance(ip, ipaddress.IPv4Address):
        raise InvalidInput(f"cannot export {location} to {client.ip}: NFS root clients need IPv4")
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise InvalidInput(f"cannot export {location} to {client.ip}: not a machine's address")
    return str(ip)


class NfsStorage(StorageDriver):
    """NFS storage served by nfs-ganesha on this host (one directory per volume)."""

    name = "nfs"
    description = "NFS exports served by nfs-ganesha on this host (one directory per volume)"

    def __init__(self, settings: Any, nfs: NfsSettings | None = None) -> None:
        """``nfs`` overrides the plugin settings read from the environment (tests, the service)."""
        super().__init__(settings)
        self._nfs: NfsSettings | None = nfs

    # -- configuration ---------------------------------------------------

    @property
    def nfs(self) -> NfsSettings:
        """The plugin settings, read on first use (so a bad one fails the call, not the load)."""
        if self._nfs is None:
            self._nfs = load_settings()
        return self._nfs

    def _export_root(self, doing: str) -> Path:
        root = self.nfs.export_root
        if root is None:
            raise DriverError(
                f"cannot {doing}: NFS storage is not configured on this host; set QRM_NFS_EXPORT_ROOT "
                "(the directory holding the volumes) and QRM_NFS_GANESHA_CONFIG "
                "(remote NFS hosts are not managed yet)"
            )
        if not root.is_dir():
            raise DriverError(f"cannot {doing}: the export root {root} does not exist; create it first")
        real = os.path.realpath(root)
        if real != str(root):
            # Clients mount the exported path itself (nfsroot=ADDR:PATH): it must be the real one.
            raise DriverError(
                f"cannot {doing}: the export root {root} goes through a symbolic link; "
                f"set QRM_NFS_EXPORT_ROOT to its real path {real}"
            )
        return root

    def _ganesha_config(self, doing: str) -> Path:
        path = self.nfs.ganesha_config
        if path is None:
            raise DriverError(
                f"cannot {doing}: set QRM_NFS_GANESHA_CONFIG to the EXPORT file this driver "
                "owns (include it from ganesha.conf with %include)"
            )
        if not path.parent.is_dir():
            raise DriverError(f"cannot {doing}: the directory of {path} does not exist")
        return path

    def _volume_path(self, root: Path, location: str) -> Path:
        check_location_syntax(location)
        path = Path(location)
        if path.parent != root or not VOLUME_NAME.match(path.name):
            raise InvalidInput(
                f"NFS location {location} is not a volume directly under the export root {root}"
            )
        return path

    # -- pure operations -------------------------------------------------

    def validate_server(self, storage: StorageTarget) -> None:
        check_ipv4_server(storage.address)

    def validate_location(self, storage: StorageTarget, location: str) -> None:
        """Syntax always; with an export root configured, also that the volume
        exists there as a real directory (importing records existing data)."""
        check_location_syntax(location)
        root = self.nfs.export_root
        if root is None:
            return
        path = self._volume_path(root, location)
        if path.is_symlink() or not path.is_dir():
            raise InvalidInput(
                f"NFS location {location} is not an existing directory on this storage server "
                "(create the volume with --size instead)"
            )

    def describe_root(self, storage: StorageTarget, location: str) -> RootSpec:
        """``root=/dev/nfs nfsroot=ADDR:PATH,vers=3,tcp ip=dhcp rw``.

        Read both by the kernel's own nfsroot and by Debian's initramfs-tools
        (``root=/dev/nfs`` selects its nfs boot script, which hands
        ``vers=3,tcp`` to klibc's nfsmount and mounts read-write because of
        ``rw``). NFSv3 over TCP: what klibc nfsmount speaks; no locking
        (ganesha runs without NLM and initramfs-tools mounts with nolock).
        """
        address = check_ipv4_server(storage.address)
        check_location_syntax(location)
        return RootSpec(
            kernel_args=("root=/dev/nfs", f"nfsroot={address}:{location},vers=3,tcp", "ip=dhcp", "rw"),
            description=f"nfs {address}:{location}",
        )

    def detect_missing_dependencies(self) -> list[str]:
        missing = []
        if shutil.which("ganesha.nfsd") is None:
            missing.append("ganesha.nfsd (package nfs-ganesha)")
        elif not FSAL_VFS.exists() and not list(Path("/usr/lib").glob("*/ganesha/libfsalvfs.so")):
            missing.append("FSAL_VFS (package nfs-ganesha-vfs)")
        if shutil.which("rpcbind") is None:
            missing.append("rpcbind (package rpcbind)")
        return missing

    # -- state -------------------------------------------------------------

    @contextmanager
    def _locked(self, root: Path) -> Iterator[dict[str, Any]]:
        """The driver's export record, under an exclusive lock for the whole change."""
        with open(root / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                path = root / STATE_FILE
                try:
                    state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
                except (OSError, ValueError) as exc:
                    raise DriverError(f"cannot read the NFS export record {path}: {exc}") from None
                state.setdefault("version", 1)
                state.setdefault("volumes", {})
                yield state
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _save(self, root: Path, state: dict[str, Any]) -> None:
        path = root / STATE_FILE
        candidate = ganesha.candidate_path(path)
        ganesha.write_file(candidate, json.dumps(state, indent=1, sort_keys=True) + "\n", 0o600)
        ganesha.swap_in(candidate, path)

    def _new_export_id(self, state: dict[str, Any]) -> int:
        taken = {v.get("export_id") for v in state["volumes"].values()}
        export_id = self.nfs.first_export_id
        while export_id in taken:
            export_id += 1
        if export_id > 65535:
            raise DriverError("no free NFS Export_Id left")
        return export_id

    @staticmethod
    def _exports(state: dict[str, Any]) -> list[ganesha.Export]:
        try:
            return [
                ganesha.Export(
                    int(v["export_id"]), location, tuple(sorted(v["clients"], key=ipaddress.ip_address))
                )
                for location, v in state["volumes"].items()
                if v.get("clients")
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DriverError(f"the NFS export record ({STATE_FILE}) is damaged: {exc}") from None

    def _apply(self, root: Path, state: dict[str, Any], *, require_running: bool) -> None:
        """Regenerate the EXPORT file from ``state``, prove it, swap it in, save
        ``state``, reload ganesha. Nothing changes if any step before the swap fails."""
        config = self._ganesha_config("change NFS exports")
        core = self.settings
        pid_file = self.nfs.effective_pid_file(core)
        pid = ganesha.running_pid(pid_file)
        if require_running and pid is None:
            where = f"no live ganesha.nfsd in {pid_file}" if pid_file else "set QRM_NFS_GANESHA_PID_FILE"
            raise DriverError(
                f"cannot export: nfs-ganesha is not running here ({where}); start it "
                "(or set QRM_NFS_RUN_GANESHA=true for qrm server to run it)"
            )
        exports = self._exports(state)
        text = ganesha.render(exports)
        ganesha.verify_rendered(text, exports)
        try:
            unchanged = config.read_text() == text
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            candidate = ganesha.candidate_path(config)
            try:
                ganesha.write_file(candidate, text)
                if self.nfs.check_config:
                    took = ganesha.check_with_ganesha(candidate, exports, self.nfs.reload_timeout)
                    log.debug("ganesha accepted %s in %.3f s", config, took)
                ganesha.swap_in(candidate, config)
            finally:
                candidate.unlink(missing_ok=True)
        self._save(root, state)
        if unchanged:
            return
        if pid is not None:
            ganesha.reload(pid, self.nfs.effective_log_file(core), self.nfs.reload_timeout)
        else:
            log.info("nfs-ganesha is not running; %s takes effect when it starts", config)

    # -- volumes -----------------------------------------------------------

    def create_volume(self, storage: StorageTarget, name: str, size_mb: int) -> VolumeInfo:
        """Make ``<export_root>/<name>``. A directory shares its filesystem's
        space: ``size_mb`` is checked against the free space and recorded, not enforced."""
        if not isinstance(name, str) or not VOLUME_NAME.match(name):
            raise InvalidInput(f"invalid NFS volume name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if size_mb <= 0:
            raise InvalidInput("volume size must be positive")
        root = self._export_root("create a volume")
        path = root / name
        with self._locked(root) as state:
            stat = os.statvfs(root)
            free_mb = stat.f_bavail * stat.f_frsize // (1024 * 1024)
            if size_mb > free_mb:
                raise DriverError(f"cannot create {path} of {size_mb} MB: {root} has only {free_mb} MB free")
            try:
                path.mkdir(mode=0o755)
            except FileExistsError:
                raise DriverError(f"volume {path} already exists on {storage.name}") from None
            except OSError as exc:
                raise DriverError(f"cannot create {path}: {exc.strerror}") from None
            try:
                entry = state["volumes"].setdefault(str(path), {"clients": []})
                entry.setdefault("export_id", self._new_export_id(state))
                entry["size_mb"] = size_mb
                self._save(root, state)
            except Exception:
                path.rmdir()
                raise
        return VolumeInfo(location=str(path), size_mb=size_mb)

    def remove_volume(self, storage: StorageTarget, location: str) -> None:
        root = self._export_root("remove a volume")
        path = self._volume_path(root, location)
        with self._locked(root) as state:
            entry = state["volumes"].get(location, {})
            if entry.get("clients"):
                raise DriverError(f"volume {location} is still exported to {', '.join(entry['clients'])}")
            if path.is_symlink() or not path.is_dir():
                raise NotFound(f"volume {location} does not exist on {storage.name}")
            try:
                shutil.rmtree(path)
            except OSError as exc:
                raise DriverError(f"cannot remove {location}: {exc.strerror or exc}") from None
            if location in state["volumes"]:
                del state["volumes"][location]
                self._save(root, state)

    def list_volumes(self, storage: StorageTarget) -> list[VolumeInfo]:
        root = self._export_root("list volumes")
        with self._locked(root) as state:
            volumes = []
            for entry in sorted(root.iterdir()):
                if not VOLUME_NAME.match(entry.name) or entry.is_symlink() or not entry.is_dir():
                    continue
                record = state["volumes"].get(str(entry), {})
                volumes.append(
                    VolumeInfo(
                        location=str(entry),
                        size_mb=record.get("size_mb"),
                        exported_to=tuple(record.get("clients", ())),
                    )
                )
            return volumes

    # -- exports -----------------------------------------------------------

    def export_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        """Let ``client`` mount the volume read-write as root (a diskless root
        needs root squash off). Returns once ganesha has the new exports."""
        root = self._export_root("export a volume")
        path = self._volume_path(root, location)
        ip = check_client_ip(client, location)
        # The path ganesha exports must be the directory itself, not a link out of the export root.
        if path.is_symlink() or not path.is_dir() or os.path.realpath(path) != str(path):
            raise NotFound(f"volume {location} does not exist on {storage.name}")
        with self._locked(root) as state:
            entry = state["volumes"].setdefault(location, {"clients": []})
            if "export_id" not in entry:
                entry["export_id"] = self._new_export_id(state)
            if ip not in entry["clients"]:
                entry["clients"] = sorted([*entry["clients"], ip], key=ipaddress.ip_address)
            self._apply(root, state, require_running=True)

    def unexport_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        """Withdraw ``client``'s access. Works while ganesha is down (the file
        is what it reads when it starts)."""
        root = self._export_root("unexport a volume")
        self._volume_path(root, location)
        if not client.ip:
            return  # a machine without an address was never exported to
        ip = check_client_ip(client, location)
        with self._locked(root) as state:
            entry = state["volumes"].get(location)
            if entry is None or ip not in entry.get("clients", []):
                return
            entry["clients"] = [c for c in entry["clients"] if c != ip]
            self._apply(root, state, require_running=False)

    # -- used by the service and the commands --------------------------------

    def sync(self) -> None:
        """Regenerate the EXPORT file from the record (at service start, by ``qrm nfs sync``)."""
        root = self._export_root("write the NFS export file")
        with self._locked(root) as state:
            self._apply(root, state, require_running=False)
