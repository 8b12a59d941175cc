"""The ``fake`` storage and hypervisor drivers that core ships (Ironic's fake-hardware).

They behave like real backends, with their state in JSON files under
``<data_dir>/state/`` shared by every qrm process (guarded by a file lock), so
a CLI call, a server and a test all see the same volumes and partitions.
They enforce what a real backend would: volumes must exist to be exported or
removed, a host cannot run more memory than it has, a paused partition cannot
be paused again, migration needs room on the destination.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qrm_core.drivers.base import (
    ExportClient,
    HostInfo,
    HostTarget,
    HypervisorDriver,
    PartitionInfo,
    PartitionSpec,
    RootSpec,
    StorageDriver,
    StorageTarget,
    VolumeInfo,
)
from qrm_core.errors import DriverError, InvalidInput, NotFound

_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


@contextmanager
def locked_state(path: Path) -> Iterator[dict[str, Any]]:
    """Load a JSON state file under an exclusive lock; write it back atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_suffix(path.suffix + ".lock")
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
            before = json.dumps(state, sort_keys=True)
            yield state
            after = json.dumps(state, sort_keys=True, indent=1)
            if after != before:
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(after)
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class FakeStorage(StorageDriver):
    """Volumes kept in a JSON file: for tests and demos, no data is stored."""

    name = "fake"
    description = "simulated storage server (volumes and exports kept in a state file)"

    def _path(self, storage: StorageTarget) -> Path:
        return self.settings.state_dir / "fake-storage" / f"{storage.name}.json"

    def validate_server(self, storage: StorageTarget) -> None:
        try:
            ipaddress.ip_address(storage.address)
        except ValueError:
            raise InvalidInput(f"storage address {storage.address!r} is not an IP address") from None

    def validate_location(self, storage: StorageTarget, location: str) -> None:
        if (
            not location.startswith("/")
            or any(not _SAFE.match(part) for part in location.strip("/").split("/"))
            or ".." in location.split("/")
        ):
            raise InvalidInput(
                f"location {location!r} must be an absolute path of letters, digits, '.', '_', '-'"
            )

    def create_volume(self, storage: StorageTarget, name: str, size_mb: int) -> VolumeInfo:
        if size_mb <= 0:
            raise InvalidInput("volume size must be positive")
        location = f"/volumes/{name}"
        self.validate_location(storage, location)
        with locked_state(self._path(storage)) as state:
            volumes = state.setdefault("volumes", {})
            if location in volumes:
                raise DriverError(f"volume {location} already exists on {storage.name}")
            volumes[location] = {"size_mb": size_mb, "exports": []}
        return VolumeInfo(location=location, size_mb=size_mb)

    def remove_volume(self, storage: StorageTarget, location: str) -> None:
        with locked_state(self._path(storage)) as state:
            volumes = state.setdefault("volumes", {})
            if location not in volumes:
                raise NotFound(f"volume {location} does not exist on {storage.name}")
            if volumes[location]["exports"]:
                raise DriverError(
                    f"volume {location} is still exported to {', '.join(volumes[location]['exports'])}"
                )
            del volumes[location]

    def _ensure(self, state: dict[str, Any], storage: StorageTarget, location: str) -> dict[str, Any]:
        volumes = state.setdefault("volumes", {})
        # Imported images (not created by qrm) are adopted on first use.
        return volumes.setdefault(location, {"size_mb": None, "exports": []})

    def export_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        if not client.ip:
            raise InvalidInput(f"cannot export {location} to {client.mac}: it has no IP address")
        with locked_state(self._path(storage)) as state:
            volume = self._ensure(state, storage, location)
            if client.ip not in volume["exports"]:
                volume["exports"].append(client.ip)

    def unexport_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        with locked_state(self._path(storage)) as state:
            volume = self._ensure(state, storage, location)
            if client.ip in volume["exports"]:
                volume["exports"].remove(client.ip)

    def describe_root(self, storage: StorageTarget, location: str) -> RootSpec:
        return RootSpec(
            kernel_args=(f"qrm.root=fake:{storage.address}:{location}",),
            description=f"fake {storage.address}:{location}",
        )

    def list_volumes(self, storage: StorageTarget) -> list[VolumeInfo]:
        with locked_state(self._path(storage)) as state:
            return [
                VolumeInfo(location=loc, size_mb=v["size_mb"], exported_to=tuple(v["exports"]))
                for loc, v in sorted(state.get("volumes", {}).items())
            ]


def random_mac(prefix: str = "52:54:00") -> str:
    """A locally administered MAC under ``prefix`` (QEMU's by default)."""
    tail = ":".join(f"{random.randint(0, 255):02x}" for _ in range(3))
    return f"{prefix}:{tail}"


class FakeHypervisor(HypervisorDriver):
    """Partitions kept in a JSON file per host; capacity and states are enforced."""

    name = "fake"
    description = "simulated hypervisor (partitions kept in a state file per host)"

    def _path(self, host: HostTarget) -> Path:
        return self.settings.state_dir / "fake-hypervisor" / f"host-{host.mac.replace(':', '')}.json"

    def validate_host(self, host: HostTarget) -> None:
        if host.cpus < 1 or host.memory_mb < 1:
            raise InvalidInput(f"host {host.mac} reports no CPUs or memory")

    def _partition(self, state: dict[str, Any], host: HostTarget, name: str) -> dict[str, Any]:
        partition = state.setdefault("partitions", {}).get(name)
        if partition is None:
            raise NotFound(f"partition {name!r} does not exist on host {host.hostname or host.mac}")
        return partition

    @staticmethod
    def _used_memory(state: dict[str, Any], exclude: str | None = None) -> int:
        return sum(
            p["memory_mb"]
            for n, p in state.get("partitions", {}).items()
            if p["state"] in ("running", "paused") and n != exclude
        )

    @staticmethod
    def _info(name: str, p: dict[str, Any]) -> PartitionInfo:
        return PartitionInfo(
            name=name,
            state=p["state"],
            cpus=p["cpus"],
            memory_mb=p["memory_mb"],
            mac=p["mac"],
            cpu_pinning={int(k): tuple(v) for k, v in p.get("pinning", {}).items()},
        )

    def host_info(self, host: HostTarget) -> HostInfo:
        with locked_state(self._path(host)) as state:
            used = self._used_memory(state)
            return HostInfo(
                hypervisor="fake",
                version="1.0",
                cpus=host.cpus,
                memory_mb=host.memory_mb,
                free_memory_mb=host.memory_mb - used,
                partitions=len(state.get("partitions", {})),
            )

    def list_partitions(self, host: HostTarget) -> list[PartitionInfo]:
        with locked_state(self._path(host)) as state:
            return [self._info(n, p) for n, p in sorted(state.get("partitions", {}).items())]

    def get_partition(self, host: HostTarget, name: str) -> PartitionInfo:
        with locked_state(self._path(host)) as state:
            return self._info(name, self._partition(state, host, name))

    def create_partition(self, host: HostTarget, spec: PartitionSpec) -> PartitionInfo:
        self.validate_host(host)
        if not _SAFE.match(spec.name):
            raise InvalidInput(f"partition name {spec.name!r} is not valid")
        if spec.cpus < 1 or spec.memory_mb < 1:
            raise InvalidInput("a partition needs at least 1 CPU and 1 MB of memory")
        if spec.cpus > host.cpus:
            raise DriverError(f"host {host.hostname or host.mac} has only {host.cpus} CPUs")
        if spec.memory_mb > host.memory_mb:
            raise DriverError(f"host {host.hostname or host.mac} has only {host.memory_mb} MB")
        with locked_state(self._path(host)) as state:
            partitions = state.setdefault("partitions", {})
            if spec.name in partitions:
                raise DriverError(f"partition {spec.name!r} already exists on this host")
            mac = spec.mac or random_mac()
            partitions[spec.name] = {
                "state": "stopped",
                "cpus": spec.cpus,
                "memory_mb": spec.memory_mb,
                "mac": mac,
                "pinning": {},
            }
            return self._info(spec.name, partitions[spec.name])

    def start_partition(self, host: HostTarget, name: str) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if p["state"] == "running":
                return
            if p["state"] == "paused":
                raise DriverError(f"partition {name!r} is paused; unpause it instead")
            if self._used_memory(state) + p["memory_mb"] > host.memory_mb:
                raise DriverError(f"not enough memory on host {host.hostname or host.mac} to start {name!r}")
            p["state"] = "running"

    def stop_partition(self, host: HostTarget, name: str, force: bool = False) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if p["state"] == "paused" and not force:
                raise DriverError(f"partition {name!r} is paused; unpause it or stop with force")
            p["state"] = "stopped"

    def destroy_partition(self, host: HostTarget, name: str) -> None:
        with locked_state(self._path(host)) as state:
            self._partition(state, host, name)
            del state["partitions"][name]

    def pause_partition(self, host: HostTarget, name: str) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if p["state"] != "running":
                raise DriverError(f"partition {name!r} is {p['state']}, not running")
            p["state"] = "paused"

    def unpause_partition(self, host: HostTarget, name: str) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if p["state"] != "paused":
                raise DriverError(f"partition {name!r} is {p['state']}, not paused")
            p["state"] = "running"

    def set_memory(self, host: HostTarget, name: str, memory_mb: int) -> None:
        if memory_mb < 1:
            raise InvalidInput("memory must be at least 1 MB")
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if p["state"] in ("running", "paused") and (
                self._used_memory(state, exclude=name) + memory_mb > host.memory_mb
            ):
                raise DriverError(f"not enough memory on host {host.hostname or host.mac}")
            p["memory_mb"] = memory_mb

    def set_vcpus(self, host: HostTarget, name: str, cpus: int) -> None:
        if cpus < 1:
            raise InvalidInput("a partition needs at least 1 CPU")
        if cpus > host.cpus:
            raise DriverError(f"host {host.hostname or host.mac} has only {host.cpus} CPUs")
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            p["cpus"] = cpus
            p["pinning"] = {k: v for k, v in p.get("pinning", {}).items() if int(k) < cpus}

    def pin_vcpus(self, host: HostTarget, name: str, pinning: dict[int, tuple[int, ...]]) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            for vcpu, cpus in pinning.items():
                if vcpu >= p["cpus"]:
                    raise InvalidInput(f"virtual CPU {vcpu} does not exist")
                if any(c >= host.cpus for c in cpus):
                    raise InvalidInput(f"host {host.hostname or host.mac} has only {host.cpus} CPUs")
            p["pinning"] = {str(k): list(v) for k, v in pinning.items()}

    def migrate_partition(
        self, host: HostTarget, name: str, destination: HostTarget, live: bool = True
    ) -> None:
        if destination.mac == host.mac:
            raise InvalidInput("source and destination host are the same")
        # Lock both hosts in a fixed order so two migrations cannot deadlock.
        first, second = sorted([host, destination], key=lambda h: h.mac)
        with locked_state(self._path(first)) as s1, locked_state(self._path(second)) as s2:
            src, dst = (s1, s2) if first is host else (s2, s1)
            p = self._partition(src, host, name)
            if live and p["state"] != "running":
                raise DriverError(f"live migration needs a running partition; {name!r} is {p['state']}")
            if name in dst.setdefault("partitions", {}):
                raise DriverError(f"partition {name!r} already exists on the destination")
            if p["state"] in ("running", "paused") and (
                self._used_memory(dst) + p["memory_mb"] > destination.memory_mb
            ):
                raise DriverError("not enough memory on the destination host")
            if p["cpus"] > destination.cpus:
                raise DriverError("the destination host has too few CPUs")
            dst["partitions"][name] = dict(p, pinning={})
            del src["partitions"][name]
