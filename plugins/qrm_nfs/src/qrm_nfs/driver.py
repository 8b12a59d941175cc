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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qrm_core.plugin_api import (
    DriverError,
    ExportClient,
    ExportOutcome,
    ExportRequest,
    InvalidInput,
    NotFound,
    QrmError,
    RootSpec,
    StorageDriver,
    StorageTarget,
    VolumeInfo,
    cow_probe,
    is_remote_storage,
    storage_runner,
)
from qrm_core.plugin_api import shell_quote as q
from qrm_nfs import ganesha, kernel
from qrm_nfs.remote_server import RemoteNfs, remote_config
from qrm_nfs.settings import NfsSettings, load_settings

log = logging.getLogger("qrm.plugins.nfs")

VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Snapshots of ``<export_root>/<name>`` are ``<export_root>/.qrm-snapshots/<name>/<label>/``
#: (on the same filesystem, so copy-on-write works where it can; never exported).
SNAPSHOTS = ".qrm-snapshots"
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
    """NFS storage served by nfs-ganesha or the kernel's nfsd (``server=kernel``), one directory per volume."""

    name = "nfs"
    description = "NFS exports served by nfs-ganesha or the kernel's nfsd (one directory per volume)"

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

    def _remote(self, storage: StorageTarget) -> RemoteNfs | None:
        """The server over SSH (its own settings), or None for this machine."""
        if not is_remote_storage(storage.settings):
            return None
        return RemoteNfs(storage, storage_runner(self.settings, storage))

    def validate_server(self, storage: StorageTarget) -> None:
        check_ipv4_server(storage.address)
        if self._kernel(storage):
            kernel.exports_file(storage.settings)
        if is_remote_storage(storage.settings):
            remote_config(storage.settings)

    @staticmethod
    def _kernel(storage: StorageTarget) -> bool:
        """Served by the kernel's nfsd (``server=kernel``) rather than nfs-ganesha."""
        return kernel.server_kind(storage.settings) == "kernel"

    def _missing_here(self, storage: StorageTarget) -> list[str]:
        if self._kernel(storage):
            return [] if shutil.which("exportfs") else ["exportfs (package nfs-kernel-server)"]
        return self.detect_missing_dependencies()

    def check_server(self, storage: StorageTarget) -> None:
        """Over SSH: ganesha there and running, its directories there. Here: with an export
        root configured, ganesha installed and the export root there (without, this host
        only records locations, as before: nothing to check)."""
        server = self._remote(storage)
        if server is not None:
            server.check()
            return
        if self._kernel(storage):
            # The kernel's nfsd is served through exportfs whether or not volumes live here yet.
            missing = self._missing_here(storage)
            if missing:
                raise DriverError(f"NFS storage on this machine lacks {', '.join(missing)}")
            parent = Path(kernel.exports_file(storage.settings)).parent
            if not parent.is_dir():
                raise DriverError(
                    f"NFS storage on this machine has no directory {parent} for its exports file"
                )
        if self.nfs.export_root is None:
            return
        missing = self._missing_here(storage)
        if missing:
            raise DriverError(f"NFS storage on this machine lacks {', '.join(missing)}")
        self._export_root("use it")

    def export_readiness(self, storage: StorageTarget) -> str | None:
        """On this machine: an export root configured and ganesha installed (over
        SSH, ``check_server`` looked at the server when it was added)."""
        if is_remote_storage(storage.settings):
            return None
        if self.nfs.export_root is None:
            return (
                "NFS storage is not configured on this host; set QRM_NFS_EXPORT_ROOT "
                "(the directory holding the volumes) and QRM_NFS_GANESHA_CONFIG, or manage it over SSH"
            )
        missing = self._missing_here(storage)
        return f"NFS storage on this machine lacks {', '.join(missing)}" if missing else None

    def validate_location(self, storage: StorageTarget, location: str) -> None:
        """Syntax always; with an export root configured here, also that the volume
        exists there as a real directory (importing records existing data)."""
        check_location_syntax(location)
        server = self._remote(storage)
        if server is not None:
            server.volume_path(location, "use a volume")
            return
        root = self.nfs.export_root
        if root is None:
            return
        path = self._volume_path(root, location)
        if path.is_symlink() or not path.is_dir():
            raise InvalidInput(
                f"NFS location {location} is not an existing directory on this storage server "
                "(create the volume with --size instead)"
            )

    def describe_root(
        self,
        storage: StorageTarget,
        location: str,
        client: ExportClient | None = None,
        *,
        shared: bool = False,
    ) -> RootSpec:
        """``root=/dev/nfs nfsroot=ADDR:PATH,vers=3,tcp ip=dhcp rw``; shared (a pool on one
        image): ``ro qrm.overlay=tmpfs`` instead of ``rw``.

        Read by qrm's node agent (busybox mount with the kernel's text options,
        then switch_root; with the overlay, the image stays read-only below a
        writable layer in RAM), by the kernel's own nfsroot and by Debian's
        initramfs-tools (``root=/dev/nfs`` selects its nfs boot script, which
        hands ``vers=3,tcp`` to klibc's nfsmount). NFSv3 over TCP, no locking
        (ganesha runs without NLM; the agent and initramfs-tools mount with
        nolock).
        """
        address = check_ipv4_server(storage.address)
        check_location_syntax(location)
        mode = ("ro", "qrm.overlay=tmpfs") if shared else ("rw",)
        return RootSpec(
            kernel_args=("root=/dev/nfs", f"nfsroot={address}:{location},vers=3,tcp", "ip=dhcp", *mode),
            description=f"nfs {address}:{location}" + (" (read-only, overlay)" if shared else ""),
            kind="nfs",
            options={"server": str(address), "path": location, "mode": "ro" if shared else "rw"},
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
        """The EXPORT blocks of the record. A volume exported to more than one machine is
        read-only for all of them: never two machines on a writable image (shared pools
        mount it read-only below an overlay anyway)."""
        try:
            return [
                ganesha.Export(
                    int(v["export_id"]),
                    location,
                    tuple(sorted(v["clients"], key=ipaddress.ip_address)),
                    "RO" if len(v["clients"]) > 1 else "RW",
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

    def _apply_kernel(self, storage: StorageTarget, root: Path, state: dict[str, Any]) -> None:
        """The exports file from ``state`` (same record, same RW/RO rules as for ganesha),
        proven by the strict parser, swapped in and applied by ``exportfs -ra``; ``state``
        is saved only once exportfs accepted it (see :mod:`qrm_nfs.kernel`)."""
        exports = self._exports(state)
        text = kernel.render(exports)
        kernel.verify_rendered(text, exports)
        path = kernel.exports_file(storage.settings)
        runner = storage_runner(self.settings, storage)
        done = runner.script("set -u\n" + kernel.apply_script(path, text), timeout=120)
        kernel.outcome(done.stdout, done.stderr, runner.where)
        self._save(root, state)

    # -- volumes -----------------------------------------------------------

    def create_volume(self, storage: StorageTarget, name: str, size_mb: int) -> VolumeInfo:
        """Make ``<export_root>/<name>``. A directory shares its filesystem's
        space: ``size_mb`` is checked against the free space and recorded, not enforced."""
        if not isinstance(name, str) or not VOLUME_NAME.match(name):
            raise InvalidInput(f"invalid NFS volume name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if size_mb <= 0:
            raise InvalidInput("volume size must be positive")
        server = self._remote(storage)
        if server is not None:
            return server.create_volume(name, size_mb)
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
        server = self._remote(storage)
        if server is not None:
            check_location_syntax(location)
            server.remove_volume(location)
            self._script(storage, f"rm -rf -- {q(self._snapshots(storage, location, 'remove a volume'))}\n")
            return
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
            shutil.rmtree(root / SNAPSHOTS / path.name, ignore_errors=True)

    def list_volumes(self, storage: StorageTarget) -> list[VolumeInfo]:
        server = self._remote(storage)
        if server is not None:
            return server.list_volumes()
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
        """Let ``client`` mount the volume as root (a diskless root needs root squash off):
        read-write while it is the only one, read-only for all when there are more.
        Returns once ganesha has the new exports."""
        (outcome,) = self.export_volumes(storage, [ExportRequest(location, client)])
        if outcome.error is not None:
            raise outcome.error

    def unexport_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        """Withdraw ``client``'s access. Works while ganesha is down (the file
        is what it reads when it starts)."""
        (outcome,) = self.unexport_volumes(storage, [ExportRequest(location, client)])
        if outcome.error is not None:
            raise outcome.error

    def export_volumes(
        self, storage: StorageTarget, requests: Sequence[ExportRequest]
    ) -> list[ExportOutcome]:
        """Every request in one change of the EXPORT file: one check by a throwaway
        ganesha, one swap, one reload (1,000 exports in one pass, not 1,000 reloads).
        A request that cannot be done (no such volume, no address) fails alone; if
        ganesha refuses the new file, every request fails and nothing changed."""
        return self._batch(storage, requests, grant=True)

    def unexport_volumes(
        self, storage: StorageTarget, requests: Sequence[ExportRequest]
    ) -> list[ExportOutcome]:
        """Withdraw many accesses with one change of the EXPORT file (as :meth:`export_volumes`)."""
        return self._batch(storage, requests, grant=False)

    def _batch(
        self, storage: StorageTarget, requests: Sequence[ExportRequest], *, grant: bool
    ) -> list[ExportOutcome]:
        errors: dict[int, QrmError] = {}
        wanted: list[tuple[int, str, str]] = []  # (request index, location, client address)
        try:
            server = self._remote(storage)
            if server is not None:
                return self._remote_batch(server, requests, grant=grant)
            root = self._export_root("export a volume" if grant else "unexport a volume")
        except QrmError as exc:
            return [ExportOutcome(r, exc) for r in requests]
        for index, request in enumerate(requests):
            location, client = request.location, request.client
            try:
                path = self._volume_path(root, location)
                if not grant and not client.ip:
                    continue  # a machine without an address was never exported to
                ip = check_client_ip(client, location)
                # The path ganesha exports must be the directory itself, not a link out of the export root.
                if grant and (path.is_symlink() or not path.is_dir() or os.path.realpath(path) != str(path)):
                    raise NotFound(f"volume {location} does not exist on {storage.name}")
            except QrmError as exc:
                errors[index] = exc
                continue
            wanted.append((index, location, ip))
        if wanted:
            try:
                with self._locked(root) as state:
                    changed = False
                    for _, location, ip in wanted:
                        if grant:
                            entry = state["volumes"].setdefault(location, {"clients": []})
                            if "export_id" not in entry:
                                entry["export_id"] = self._new_export_id(state)
                            if ip not in entry["clients"]:
                                entry["clients"] = sorted([*entry["clients"], ip], key=ipaddress.ip_address)
                                changed = True
                        else:
                            entry = state["volumes"].get(location)
                            if entry is not None and ip in entry.get("clients", []):
                                entry["clients"] = [c for c in entry["clients"] if c != ip]
                                changed = True
                    if (changed or grant) and self._kernel(storage):
                        self._apply_kernel(storage, root, state)
                    elif changed or grant:
                        self._apply(root, state, require_running=grant)
            except QrmError as exc:
                for index, _, _ in wanted:
                    errors[index] = exc
        return [ExportOutcome(r, errors.get(i)) for i, r in enumerate(requests)]

    def _remote_batch(
        self, server: RemoteNfs, requests: Sequence[ExportRequest], *, grant: bool
    ) -> list[ExportOutcome]:
        errors: dict[int, QrmError] = {}
        wanted: list[tuple[int, str, str]] = []
        for index, request in enumerate(requests):
            try:
                check_location_syntax(request.location)
                server.volume_path(request.location, "export a volume")
                if not grant and not request.client.ip:
                    continue
                wanted.append((index, request.location, check_client_ip(request.client, request.location)))
            except QrmError as exc:
                errors[index] = exc
        if wanted:
            try:
                errors.update(server.batch(requests, wanted, grant=grant))
            except QrmError as exc:
                for index, _, _ in wanted:
                    errors.setdefault(index, exc)
        return [ExportOutcome(r, errors.get(i)) for i, r in enumerate(requests)]

    # -- used by the service and the commands --------------------------------

    def sync(self) -> None:
        """Regenerate the EXPORT file from the record (at service start, by ``qrm nfs sync``)."""
        root = self._export_root("write the NFS export file")
        with self._locked(root) as state:
            self._apply(root, state, require_running=False)

    # -- filling, cloning, snapshots (here or over SSH: one shell script each) --

    def _root_text(self, storage: StorageTarget, doing: str) -> str:
        server = self._remote(storage)
        if server is not None:
            return server._root(doing)
        return str(self._export_root(doing))

    def _volume_text(self, storage: StorageTarget, location: str, doing: str) -> tuple[str, str]:
        """(export root, volume name) of ``location``, checked."""
        check_location_syntax(location)
        root = self._root_text(storage, doing)
        parent, _, name = location.rpartition("/")
        if parent != root or not VOLUME_NAME.match(name):
            raise InvalidInput(
                f"NFS location {location} is not a volume directly under the export root {root}"
            )
        return root, name

    def _snapshots(self, storage: StorageTarget, location: str, doing: str) -> str:
        root, name = self._volume_text(storage, location, doing)
        return f"{root}/{SNAPSHOTS}/{name}"

    @staticmethod
    def _label(label: str) -> str:
        if not isinstance(label, str) or not LABEL.match(label):
            raise InvalidInput(f"snapshot label {label!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return label

    def _script(self, storage: StorageTarget, text: str, timeout: float = 6 * 3600) -> str:
        done = storage_runner(self.settings, storage).script("set -u\n" + text, timeout=timeout)
        if not done.ok:
            raise DriverError(f"NFS storage {storage.name}: {done.last_error()}")
        return done.stdout

    def _said(self, out: str, storage: StorageTarget, location: str, label: str | None = None) -> str:
        lines = [line for line in out.splitlines() if line.startswith("qrm-")]
        said = lines[-1] if lines else ""
        if said == "qrm-missing":
            raise NotFound(f"volume {location} does not exist on {storage.name}")
        if said == "qrm-no-snapshot":
            raise NotFound(f"volume {location} has no snapshot {label!r}")
        if said == "qrm-exists":
            raise DriverError(f"volume {location} already has a snapshot {label!r}")
        if said == "qrm-taken":
            raise DriverError(f"a volume named {label} already exists on {storage.name}")
        if said.startswith("qrm-failed"):
            raise DriverError(f"NFS storage {storage.name}: {said[11:] or 'the copy failed'}")
        if not said.startswith("qrm-done"):
            raise DriverError(f"NFS storage {storage.name} did not finish the operation on {location}")
        return said[9:].strip()

    @staticmethod
    def _volume_check(path: str) -> str:
        return f"test -d {q(path)} && test ! -L {q(path)} || {{ echo qrm-missing; exit 0; }}\n"

    @staticmethod
    def _copy(src: str, dest: str) -> str:
        """Copy directory ``src`` to a new ``dest`` (through ``dest.partial``, renamed at the end)."""
        partial = dest.rsplit("/", 1)[0] + "/.partial-" + dest.rsplit("/", 1)[1]
        return (
            f"rm -rf -- {q(partial)}\n"
            f"if ! err=$(cp -a $cpopt -- {q(src)} {q(partial)} 2>&1); then rm -rf -- {q(partial)}; "
            'echo "qrm-failed $(printf %s "$err" | tail -n 1)"; exit 0; fi\n'
            f"mv -- {q(partial)} {q(dest)} || exit 4\n"
        )

    def open_tree(self, storage: StorageTarget, location: str) -> str:
        """The volume's directory itself: files rsynced or unpacked there are the image."""
        _root, _name = self._volume_text(storage, location, "fill a volume")
        self._said(self._script(storage, self._volume_check(location) + "echo qrm-done\n"), storage, location)
        return location

    def read_tree(self, storage: StorageTarget, location: str) -> str:
        """The volume's directory itself: its files are the image."""
        self._volume_text(storage, location, "read a volume")
        self._said(self._script(storage, self._volume_check(location) + "echo qrm-done\n"), storage, location)
        return location

    def close_tree(self, storage: StorageTarget, location: str, tree: str) -> str:
        if tree != location:
            raise InvalidInput(f"{tree} is not the directory of NFS volume {location}")
        self._volume_text(storage, location, "fill a volume")
        out = self._script(
            storage, self._volume_check(location) + f'echo "qrm-done $(du -sm -- {q(location)} | cut -f1)"\n'
        )
        return f"files in place in the NFS directory ({self._said(out, storage, location)} MB)"

    def clone_volume(self, storage: StorageTarget, location: str, name: str) -> VolumeInfo:
        """``cp -a`` of the directory: copy-on-write (``--reflink``) where the export root's
        filesystem can (XFS with reflink, btrfs), a full copy otherwise."""
        if not isinstance(name, str) or not VOLUME_NAME.match(name):
            raise InvalidInput(f"invalid NFS volume name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        root, _ = self._volume_text(storage, location, "clone a volume")
        new = f"{root}/{name}"
        script = (
            self._volume_check(location)
            + f"test -e {q(new)} && {{ echo qrm-taken; exit 0; }}\n"
            + cow_probe(root)
            + "\n"
            + self._copy(location, new)
            + 'echo "qrm-done $how"\n'
        )
        how = self._said(self._script(storage, script), storage, location, name)
        return VolumeInfo(location=new, how=how)

    def snapshot_volume(self, storage: StorageTarget, location: str, label: str) -> str:
        """A copy of the directory under ``.qrm-snapshots`` (copy-on-write where it can be)."""
        self._label(label)
        snaps = self._snapshots(storage, location, "snapshot a volume")
        dest = f"{snaps}/{label}"
        script = (
            self._volume_check(location)
            + f"test -e {q(dest)} && {{ echo qrm-exists; exit 0; }}\n"
            + f"mkdir -p -- {q(snaps)} || exit 3\n"
            + cow_probe(snaps)
            + "\n"
            + self._copy(location, dest)
            + f"echo {q(label)} >> {q(snaps + '/.order')}\n"
            + 'echo "qrm-done $how"\n'
        )
        return self._said(self._script(storage, script), storage, location, label)

    def list_snapshots(self, storage: StorageTarget, location: str) -> list[str]:
        snaps = self._snapshots(storage, location, "list snapshots")
        out = self._script(
            storage,
            self._volume_check(location)
            + f"cd {q(snaps)} 2>/dev/null || {{ echo qrm-done; exit 0; }}\n"
            + 'if [ -f .order ]; then while read -r l; do [ -d "$l" ] && echo "snap $l"; done < .order; fi\n'
            + "echo qrm-done\n",
        )
        self._said(out, storage, location)
        labels = [line[5:] for line in out.splitlines() if line.startswith("snap ")]
        return [label for label in dict.fromkeys(labels) if LABEL.match(label)]

    def revert_volume(self, storage: StorageTarget, location: str, label: str) -> str:
        """Empty the volume's directory (the directory stays: it is what ganesha exports)
        and copy the snapshot back into it (copy-on-write where it can be)."""
        self._label(label)
        snap = f"{self._snapshots(storage, location, 'revert a volume')}/{label}"
        script = (
            self._volume_check(location)
            + f"test -d {q(snap)} || {{ echo qrm-no-snapshot; exit 0; }}\n"
            + cow_probe(location)
            + "\n"
            + f"find {q(location)} -mindepth 1 -maxdepth 1 -exec rm -rf -- {{}} + || exit 4\n"
            + f"if ! err=$(cp -a $cpopt -- {q(snap)}/. {q(location)}/ 2>&1); then "
            'echo "qrm-failed $(printf %s "$err" | tail -n 1)"; exit 0; fi\n'
            + f"chmod --reference={q(snap)} -- {q(location)} && chown --reference={q(snap)} -- {q(location)}\n"
            + 'echo "qrm-done $how"\n'
        )
        return self._said(self._script(storage, script), storage, location, label)

    def remove_snapshot(self, storage: StorageTarget, location: str, label: str) -> None:
        self._label(label)
        snaps = self._snapshots(storage, location, "remove a snapshot")
        script = (
            self._volume_check(location)
            + f"test -d {q(snaps + '/' + label)} || {{ echo qrm-no-snapshot; exit 0; }}\n"
            + f"rm -rf -- {q(snaps + '/' + label)} || exit 4\n"
            + f"grep -vx -- {q(label)} {q(snaps + '/.order')} > {q(snaps + '/.order.new')}; "
            + f"mv -- {q(snaps + '/.order.new')} {q(snaps + '/.order')}\n"
            + "echo qrm-done\n"
        )
        self._said(self._script(storage, script), storage, location, label)
