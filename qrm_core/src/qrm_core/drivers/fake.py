"""The ``fake`` storage, hypervisor and power drivers that core ships (Ironic's fake-hardware).

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
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qrm_core.drivers.base import (
    CapacityInfo,
    ExportClient,
    HostInfo,
    HostTarget,
    HypervisorDriver,
    PartitionInfo,
    PartitionSpec,
    PowerDriver,
    PowerTarget,
    RootSpec,
    StorageDriver,
    StorageTarget,
    VolumeInfo,
)
from qrm_core.errors import DriverError, InvalidInput, NotFound
from qrm_core.remote import shell_quote, storage_runner

_SAFE = re.compile(r"[A-Za-z0-9._-]{1,64}")


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
            or len(location) > 255
            or any(not _SAFE.fullmatch(part) for part in location.strip("/").split("/"))
            or ".." in location.split("/")
        ):
            raise InvalidInput(
                f"location {location[:80]!r} must be an absolute path (at most 255 characters) of "
                "names of 1-64 letters, digits, '.', '_', '-'"
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
        shutil.rmtree(self._tree(storage, location), ignore_errors=True)

    def _tree(self, storage: StorageTarget, location: str) -> Path:
        return self.settings.state_dir / "fake-storage" / f"{storage.name}.trees" / location.strip("/")

    def open_tree(self, storage: StorageTarget, location: str) -> str:
        """A directory under the state directory (made over SSH too when the server is remote:
        the fake's files are where its commands run)."""
        with locked_state(self._path(storage)) as state:
            self._volume(state, storage, location)
        tree = self._tree(storage, location)
        done = storage_runner(self.settings, storage).script(f"mkdir -p -- {shell_quote(str(tree))}\n")
        if not done.ok:
            raise DriverError(f"cannot make {tree} on {storage.name}: {done.last_error()}")
        return str(tree)

    def read_tree(self, storage: StorageTarget, location: str) -> str:
        """The volume's directory (made empty when nothing was put into it yet)."""
        return self.open_tree(storage, location)

    def close_tree(self, storage: StorageTarget, location: str, tree: str) -> str:
        if tree != str(self._tree(storage, location)):
            raise InvalidInput(f"{tree} is not the directory of volume {location}")
        return "files kept in the fake volume's directory"

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

    def describe_root(
        self,
        storage: StorageTarget,
        location: str,
        client: ExportClient | None = None,
        *,
        shared: bool = False,
    ) -> RootSpec:
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

    def capacity(self, storage: StorageTarget) -> CapacityInfo:
        total = int(storage.settings.get("capacity_mb", "1048576"))
        with locked_state(self._path(storage)) as state:
            volumes = state.get("volumes", {})
            used = sum(v["size_mb"] or 0 for v in volumes.values())
            return CapacityInfo(total_mb=total, free_mb=max(total - used, 0), volumes=len(volumes))

    def _volume(self, state: dict[str, Any], storage: StorageTarget, location: str) -> dict[str, Any]:
        volume = state.setdefault("volumes", {}).get(location)
        if volume is None:
            raise NotFound(f"volume {location} does not exist on {storage.name}")
        return volume

    def clone_volume(self, storage: StorageTarget, location: str, name: str) -> VolumeInfo:
        new = f"/volumes/{name}"
        self.validate_location(storage, new)
        with locked_state(self._path(storage)) as state:
            source = self._volume(state, storage, location)
            if new in state["volumes"]:
                raise DriverError(f"volume {new} already exists on {storage.name}")
            state["volumes"][new] = {"size_mb": source["size_mb"], "exports": [], "snapshots": []}
        return VolumeInfo(location=new, size_mb=source["size_mb"])

    def snapshot_volume(self, storage: StorageTarget, location: str, label: str) -> None:
        _check_label(label)
        with locked_state(self._path(storage)) as state:
            snapshots = self._volume(state, storage, location).setdefault("snapshots", [])
            if label in snapshots:
                raise DriverError(f"volume {location} already has a snapshot {label!r}")
            snapshots.append(label)

    def list_snapshots(self, storage: StorageTarget, location: str) -> list[str]:
        with locked_state(self._path(storage)) as state:
            return list(self._volume(state, storage, location).get("snapshots", []))

    def revert_volume(self, storage: StorageTarget, location: str, label: str) -> None:
        with locked_state(self._path(storage)) as state:
            if label not in self._volume(state, storage, location).get("snapshots", []):
                raise NotFound(f"volume {location} has no snapshot {label!r}")

    def remove_snapshot(self, storage: StorageTarget, location: str, label: str) -> None:
        with locked_state(self._path(storage)) as state:
            snapshots = self._volume(state, storage, location).setdefault("snapshots", [])
            if label not in snapshots:
                raise NotFound(f"volume {location} has no snapshot {label!r}")
            snapshots.remove(label)


def random_mac(prefix: str = "52:54:00") -> str:
    """A locally administered MAC under ``prefix`` (QEMU's by default)."""
    tail = ":".join(f"{random.randint(0, 255):02x}" for _ in range(3))
    return f"{prefix}:{tail}"


class FakeHypervisor(HypervisorDriver):
    """Partitions kept in a JSON file per host; capacity and states are enforced.

    Each partition has its running values (``cpus``, ``memory_mb``,
    ``pinning``) and its configuration (``config``), applied at each start,
    as a real hypervisor does with live and persistent changes.
    """

    name = "fake"
    description = "simulated hypervisor (partitions kept in a state file per host)"

    def _path(self, host: HostTarget) -> Path:
        return self.settings.state_dir / "fake-hypervisor" / f"host-{host.mac.replace(':', '')}.json"

    def validate_host(self, host: HostTarget) -> None:
        if host.cpus < 1 or host.memory_mb < 1:
            raise InvalidInput(f"host {host.label} reports no CPUs or memory")

    def _partition(self, state: dict[str, Any], host: HostTarget, name: str) -> dict[str, Any]:
        partition = state.setdefault("partitions", {}).get(name)
        if partition is None:
            raise NotFound(f"partition {name!r} does not exist on host {host.label}")
        partition.setdefault(
            "config", {"cpus": partition["cpus"], "memory_mb": partition["memory_mb"], "pinning": {}}
        )
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
        shown = p if p["state"] in ("running", "paused") else p.get("config", p)
        return PartitionInfo(
            name=name,
            state=p["state"],
            cpus=shown["cpus"],
            memory_mb=shown["memory_mb"],
            mac=p["mac"],
            cpu_pinning={int(k): tuple(v) for k, v in shown.get("pinning", {}).items()},
            max_cpus=p.get("max_cpus"),
            max_memory_mb=p.get("max_memory_mb"),
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
            return [
                self._info(n, self._partition(state, host, n)) for n in sorted(state.get("partitions", {}))
            ]

    def get_partition(self, host: HostTarget, name: str) -> PartitionInfo:
        with locked_state(self._path(host)) as state:
            return self._info(name, self._partition(state, host, name))

    def create_partition(self, host: HostTarget, spec: PartitionSpec) -> PartitionInfo:
        self.validate_host(host)
        self.validate_partition(host, spec)
        if max(spec.cpus, spec.max_cpus or 0) > host.cpus:
            raise DriverError(f"host {host.label} has only {host.cpus} CPUs")
        if max(spec.memory_mb, spec.max_memory_mb or 0) > host.memory_mb:
            raise DriverError(f"host {host.label} has only {host.memory_mb} MB")
        with locked_state(self._path(host)) as state:
            partitions = state.setdefault("partitions", {})
            if spec.name in partitions:
                raise DriverError(f"partition {spec.name!r} already exists on host {host.label}")
            mac = spec.mac or random_mac()
            partitions[spec.name] = {
                "state": "stopped",
                "cpus": spec.cpus,
                "memory_mb": spec.memory_mb,
                "mac": mac,
                "pinning": {},
                "max_cpus": spec.max_cpus or spec.cpus,
                "max_memory_mb": spec.max_memory_mb or spec.memory_mb,
                "config": {"cpus": spec.cpus, "memory_mb": spec.memory_mb, "pinning": {}},
                "snapshots": {},
            }
            return self._info(spec.name, partitions[spec.name])

    def start_partition(self, host: HostTarget, name: str) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if p["state"] == "running":
                return
            if p["state"] == "paused":
                raise DriverError(f"partition {name!r} is paused; resume it instead")
            config = p["config"]
            if self._used_memory(state) + config["memory_mb"] > host.memory_mb:
                raise DriverError(f"not enough memory on host {host.label} to start {name!r}")
            p.update(cpus=config["cpus"], memory_mb=config["memory_mb"], pinning=dict(config["pinning"]))
            p["state"] = "running"

    def stop_partition(self, host: HostTarget, name: str, force: bool = False) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if p["state"] == "paused" and not force:
                raise DriverError(f"partition {name!r} is paused; resume it or stop it with force")
            p["state"] = "stopped"

    def destroy_partition(self, host: HostTarget, name: str) -> None:
        with locked_state(self._path(host)) as state:
            self._partition(state, host, name)
            del state["partitions"][name]

    def reboot_partition(self, host: HostTarget, name: str) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if p["state"] != "running":
                raise DriverError(f"partition {name!r} is {p['state']}, not running")
            config = p["config"]
            p.update(cpus=config["cpus"], memory_mb=config["memory_mb"], pinning=dict(config["pinning"]))

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

    @staticmethod
    def _check_live(p: dict[str, Any], name: str, live: bool, persistent: bool) -> bool:
        """Whether the live part applies; refuses a live-only change to a stopped partition."""
        if not (live or persistent):
            raise InvalidInput("a change must be live, persistent or both")
        running = p["state"] in ("running", "paused")
        if live and not persistent and not running:
            raise DriverError(f"partition {name!r} is not running; change its configuration instead")
        return live and running

    def set_memory(
        self, host: HostTarget, name: str, memory_mb: int, *, live: bool = True, persistent: bool = True
    ) -> None:
        if memory_mb < 1:
            raise InvalidInput("memory must be at least 1 MB")
        if memory_mb > host.memory_mb:
            raise DriverError(f"host {host.label} has only {host.memory_mb} MB")
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if self._check_live(p, name, live, persistent):
                if memory_mb > p["max_memory_mb"]:
                    raise DriverError(
                        f"partition {name!r} can grow to {p['max_memory_mb']} MB while running "
                        "(its maximum); change its configuration and restart it"
                    )
                if self._used_memory(state, exclude=name) + memory_mb > host.memory_mb:
                    raise DriverError(f"not enough memory on host {host.label}")
                p["memory_mb"] = memory_mb
            if persistent:
                p["config"]["memory_mb"] = memory_mb
                p["max_memory_mb"] = max(p["max_memory_mb"], memory_mb)

    def set_vcpus(
        self, host: HostTarget, name: str, cpus: int, *, live: bool = True, persistent: bool = True
    ) -> None:
        if cpus < 1:
            raise InvalidInput("a partition needs at least 1 CPU")
        if cpus > host.cpus:
            raise DriverError(f"host {host.label} has only {host.cpus} CPUs")
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if self._check_live(p, name, live, persistent):
                if cpus > p["max_cpus"]:
                    raise DriverError(
                        f"partition {name!r} can have at most {p['max_cpus']} CPUs while running "
                        "(its maximum); change its configuration and restart it"
                    )
                p["cpus"] = cpus
                p["pinning"] = {k: v for k, v in p["pinning"].items() if int(k) < cpus}
            if persistent:
                config = p["config"]
                config["cpus"] = cpus
                config["pinning"] = {k: v for k, v in config["pinning"].items() if int(k) < cpus}
                p["max_cpus"] = max(p["max_cpus"], cpus)

    def pin_vcpus(
        self,
        host: HostTarget,
        name: str,
        pinning: dict[int, tuple[int, ...]],
        *,
        live: bool = True,
        persistent: bool = True,
    ) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            apply_live = self._check_live(p, name, live, persistent)
            for vcpu, cpus in pinning.items():
                count = p["cpus"] if apply_live else p["config"]["cpus"]
                if not 0 <= vcpu < count:
                    raise InvalidInput(f"virtual CPU {vcpu} does not exist (partition {name!r} has {count})")
                if not cpus or any(not 0 <= c < host.cpus for c in cpus):
                    raise InvalidInput(f"host {host.label} has CPUs 0-{host.cpus - 1} only")
            update = {str(k): sorted(v) for k, v in pinning.items()}
            if apply_live:
                p["pinning"] = {**p["pinning"], **update}
            if persistent:
                p["config"]["pinning"] = {**p["config"]["pinning"], **update}

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
                raise DriverError(f"partition {name!r} already exists on {destination.label}")
            if p["state"] in ("running", "paused") and (
                self._used_memory(dst) + p["memory_mb"] > destination.memory_mb
            ):
                raise DriverError(f"not enough memory on {destination.label}")
            if max(p["cpus"], p["config"]["cpus"]) > destination.cpus:
                raise DriverError(f"{destination.label} has too few CPUs")
            # Pinning names the source's CPUs: it does not travel.
            moved = dict(p, pinning={}, config=dict(p["config"], pinning={}))
            if not live:
                moved["state"] = "stopped"
            dst["partitions"][name] = moved
            del src["partitions"][name]

    def snapshot_partition(self, host: HostTarget, name: str, label: str) -> None:
        _check_label(label)
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            snapshots = p.setdefault("snapshots", {})
            if label in snapshots:
                raise DriverError(f"partition {name!r} already has a snapshot {label!r}")
            snapshots[label] = {"config": dict(p["config"]), "taken": len(snapshots)}

    def revert_partition(self, host: HostTarget, name: str, label: str) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            snapshot = p.setdefault("snapshots", {}).get(label)
            if snapshot is None:
                raise NotFound(f"partition {name!r} has no snapshot {label!r}")
            p["config"] = dict(snapshot["config"])

    def remove_partition_snapshot(self, host: HostTarget, name: str, label: str) -> None:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            if p.setdefault("snapshots", {}).pop(label, None) is None:
                raise NotFound(f"partition {name!r} has no snapshot {label!r}")

    def list_partition_snapshots(self, host: HostTarget, name: str) -> list[str]:
        with locked_state(self._path(host)) as state:
            p = self._partition(state, host, name)
            snapshots = p.get("snapshots", {})
            return sorted(snapshots, key=lambda label: snapshots[label]["taken"])


def _check_label(label: str) -> None:
    if not _SAFE.fullmatch(label):
        raise InvalidInput(f"snapshot label {label!r} must be 1-64 letters, digits, '.', '_' or '-'")


class FakePower(PowerDriver):
    """Power controllers kept in a JSON file: each machine is on or off."""

    name = "fake"
    description = "simulated power controller (machine power states kept in a state file)"

    def _path(self) -> Path:
        return self.settings.state_dir / "fake-power.json"

    def validate(self, target: PowerTarget) -> None:
        if not target.address or not _SAFE.fullmatch(target.address):
            raise InvalidInput(f"power address {target.address!r} must be letters, digits, '.', '_' or '-'")

    def _set(self, target: PowerTarget, state: str) -> None:
        self.validate(target)
        with locked_state(self._path()) as machines:
            machines[target.address or target.mac] = state

    def power_on(self, target: PowerTarget) -> None:
        self._set(target, "on")

    def power_off(self, target: PowerTarget, force: bool = True) -> None:
        self._set(target, "off")

    def power_state(self, target: PowerTarget) -> str:
        self.validate(target)
        with locked_state(self._path()) as machines:
            return str(machines.get(target.address or target.mac, "on"))

    def reset(self, target: PowerTarget) -> None:
        if self.power_state(target) != "on":
            raise DriverError(f"machine {target.label} is off; power it on instead")
        self._set(target, "on")
