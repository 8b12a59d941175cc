"""The ``example-dir`` storage driver: volumes are directories on the qrm server.

Layout: ``<storage_root>/<storage server name>/<volume>/``, with the driver's
bookkeeping beside the volumes in ``<storage_root>/<storage server name>/.volumes.json``
(size and the clients each volume is exported to).

What it is for: showing the :class:`~qrm_core.drivers.base.StorageDriver`
contract on something every machine has, and giving tests a storage type that
really creates and removes data. What it is not: a network file server. It
records exports but does not serve the directories; pair it with an NFS
server that exports ``<storage_root>`` if machines should mount them.

This module is loaded by stevedore only when a storage server of type
``example-dir`` is used; a driver with a heavy SDK imports it here, never in
the plugin's hook module.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
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
from qrm_example import settings

#: A volume (and storage server) name: one path component, no dot files.
VOLUME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: What a path may contain to be passed on a kernel command line.
PATH_TOKEN_RE = re.compile(r"^/[A-Za-z0-9._/+@%-]*$")
BOOKKEEPING = ".volumes.json"


class DirStorage(StorageDriver):
    """Volumes as directories under a local root."""

    name = "example-dir"
    description = "volumes as directories on the qrm server (example plugin)"

    # -- paths ---------------------------------------------------------------

    @property
    def root(self) -> Path:
        root = settings.load(self.settings).storage_root
        assert root is not None
        return root

    def _server_dir(self, storage: StorageTarget) -> Path:
        return self.root / storage.name

    def _volume_dir(self, storage: StorageTarget, location: str) -> Path:
        return self._server_dir(storage) / location

    @contextmanager
    def _bookkeeping(self, storage: StorageTarget) -> Iterator[dict[str, Any]]:
        """The server's bookkeeping under an exclusive lock; written back atomically."""
        directory = self._server_dir(storage)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = open(directory / ".lock", "a+")  # closed by the with below
        except OSError as exc:
            raise DriverError(f"cannot use storage directory {directory}: {exc.strerror}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = directory / BOOKKEEPING
            try:
                state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
            except ValueError:
                raise DriverError(f"bookkeeping file {path} is damaged; fix or remove it") from None
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                tmp = directory / f".volumes.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
                os.replace(tmp, path)

    def _existing(self, storage: StorageTarget, location: str) -> Path:
        self.validate_location(storage, location)
        path = self._volume_dir(storage, location)
        if not path.is_dir():
            raise NotFound(f"volume {location!r} does not exist on {storage.name} ({path})")
        return path

    # -- validation (fast, no I/O) -------------------------------------------

    def validate_server(self, storage: StorageTarget) -> None:
        # Core has checked the address is an IP; the name becomes a directory.
        if not VOLUME_RE.match(storage.name):
            raise InvalidInput(f"storage server name {storage.name!r} cannot be a directory name")
        if not PATH_TOKEN_RE.match(str(self.root)):
            raise InvalidInput(
                f"storage root {str(self.root)!r} must be an absolute path without spaces "
                f"(set {settings.ENV_PREFIX}STORAGE_ROOT)"
            )

    def validate_location(self, storage: StorageTarget, location: str) -> None:
        if not VOLUME_RE.match(location or ""):
            raise InvalidInput(
                f"location {location!r} must be a volume name: 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )

    # -- volumes ------------------------------------------------------------

    def create_volume(self, storage: StorageTarget, name: str, size_mb: int) -> VolumeInfo:
        self.validate_server(storage)
        self.validate_location(storage, name)
        if size_mb <= 0:
            raise InvalidInput("volume size must be positive")
        with self._bookkeeping(storage) as state:
            path = self._volume_dir(storage, name)
            try:
                path.mkdir()
            except FileExistsError:
                raise DriverError(f"volume {name!r} already exists on {storage.name} ({path})") from None
            except OSError as exc:
                raise DriverError(f"cannot create volume {path}: {exc.strerror}") from None
            # The size is a quota recorded for people; a directory has no size of its own.
            state.setdefault("volumes", {})[name] = {"size_mb": size_mb, "exports": []}
        return VolumeInfo(location=name, size_mb=size_mb)

    def remove_volume(self, storage: StorageTarget, location: str) -> None:
        path = self._existing(storage, location)
        with self._bookkeeping(storage) as state:
            volume = state.get("volumes", {}).get(location, {})
            if volume.get("exports"):
                raise DriverError(f"volume {location!r} is still exported to {', '.join(volume['exports'])}")
            try:
                shutil.rmtree(path)
            except OSError as exc:
                raise DriverError(f"cannot remove volume {path}: {exc.strerror}") from None
            state.get("volumes", {}).pop(location, None)

    def export_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        if not client.ip:
            raise InvalidInput(f"cannot export {location!r} to {client.mac}: it has no IP address")
        self._existing(storage, location)
        with self._bookkeeping(storage) as state:
            # Volumes made outside qrm (imported images) are adopted on first export.
            volume = state.setdefault("volumes", {}).setdefault(location, {"size_mb": None, "exports": []})
            if client.ip not in volume["exports"]:
                volume["exports"].append(client.ip)

    def unexport_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        self._existing(storage, location)
        with self._bookkeeping(storage) as state:
            volume = state.get("volumes", {}).get(location)
            if volume is not None and client.ip in volume["exports"]:
                volume["exports"].remove(client.ip)

    def describe_root(
        self,
        storage: StorageTarget,
        location: str,
        client: ExportClient | None = None,
        *,
        shared: bool = False,
    ) -> RootSpec:
        self.validate_server(storage)
        self.validate_location(storage, location)
        path = self._volume_dir(storage, location)
        return RootSpec(
            kernel_args=(f"qrm.root=dir:{storage.address}:{path}",),
            description=f"example-dir {storage.address}:{path}",
        )

    def list_volumes(self, storage: StorageTarget) -> list[VolumeInfo]:
        directory = self._server_dir(storage)
        if not directory.is_dir():
            return []
        with self._bookkeeping(storage) as state:
            known = state.get("volumes", {})
            return [
                VolumeInfo(
                    location=p.name,
                    size_mb=known.get(p.name, {}).get("size_mb"),
                    exported_to=tuple(known.get(p.name, {}).get("exports", ())),
                )
                for p in sorted(directory.iterdir())
                if p.is_dir() and VOLUME_RE.match(p.name)
            ]

    def detect_missing_dependencies(self) -> list[str]:
        """The root must be creatable and writable; checked without creating it."""
        try:
            root = self.root
        except InvalidInput as exc:
            return [exc.message]
        existing = root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            return [f"a writable directory {root} ({settings.ENV_PREFIX}STORAGE_ROOT)"]
        return []
