"""Driver interfaces: one abstract class per capability (Ironic's drivers/base.py shape).

Core knows a backend by name (a storage server's ``type``, a partition's
``hypervisor``) and loads exactly that driver through stevedore
(:meth:`qrm_core.plugins.PluginSystem.storage_driver` and ``hypervisor_driver``). Drivers receive plain value objects, never
database rows or sessions, so they can be tested against the real backend
alone. Every operation that changes something validates first: call
``validate_*`` (fast, no I/O) before acting, as Ironic does.

Errors: a driver raises :class:`qrm_core.errors.InvalidInput` for arguments it
cannot accept and :class:`qrm_core.errors.DriverError` when the backend refuses
or fails.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from qrm_core.config import Settings


class BaseDriver(abc.ABC):
    """What every driver has.

    :cvar name: The entry-point name (``nfs``, ``xen``, ``fake``).
    :cvar description: One line for ``qrm plugins list``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def detect_missing_dependencies(self) -> list[str]:
        """Name what this driver needs but cannot find (commands, libraries).

        Cheap; called by ``qrm plugins list``. Empty means ready.
        """
        return []


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageTarget:
    """A storage server as a driver sees it."""

    name: str
    type: str
    address: str
    comment: str = ""


@dataclass(frozen=True)
class ExportClient:
    """The machine a volume is exported to."""

    mac: str
    ip: str | None
    hostname: str | None = None


@dataclass(frozen=True)
class VolumeInfo:
    """A volume on a storage server."""

    location: str
    size_mb: int | None = None
    exported_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class RootSpec:
    """How a booting machine finds its root filesystem on this storage.

    :ivar kernel_args: Arguments for the kernel command line (``root=...``),
        each a single whitespace-free token.
    :ivar description: One line for people (``nfs 10.0.11.35:/exports/web``).
    """

    kernel_args: tuple[str, ...]
    description: str


class StorageDriver(BaseDriver):
    """A kind of storage server: exports volumes that hold filesystem images."""

    @abc.abstractmethod
    def validate_server(self, storage: StorageTarget) -> None:
        """Check that ``storage`` is usable by this driver (address format, comment). No I/O."""

    @abc.abstractmethod
    def validate_location(self, storage: StorageTarget, location: str) -> None:
        """Check that ``location`` names a volume this driver understands
        (an export path, an iSCSI target name). Fast: no network I/O (a
        driver managing local storage may look at local paths)."""

    @abc.abstractmethod
    def create_volume(self, storage: StorageTarget, name: str, size_mb: int) -> VolumeInfo:
        """Create an empty volume named after ``name``; return where it is."""

    @abc.abstractmethod
    def remove_volume(self, storage: StorageTarget, location: str) -> None:
        """Destroy the volume at ``location`` and its data. Removing a missing
        volume is an error."""

    @abc.abstractmethod
    def export_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        """Make the volume reachable by ``client``. Idempotent."""

    @abc.abstractmethod
    def unexport_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        """Withdraw ``client``'s access to the volume. Idempotent."""

    @abc.abstractmethod
    def describe_root(self, storage: StorageTarget, location: str) -> RootSpec:
        """Say how a machine boots with this volume as its root filesystem."""

    def list_volumes(self, storage: StorageTarget) -> list[VolumeInfo]:
        """The volumes on the server, where the backend can tell."""
        raise NotImplementedError(f"{self.name} cannot list volumes")


# ---------------------------------------------------------------------------
# Hypervisors (partitioning)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HostTarget:
    """A resource that hosts partitions, as a hypervisor driver sees it."""

    resource_id: int
    mac: str
    address: str | None
    hostname: str | None
    cpus: int
    memory_mb: int


@dataclass(frozen=True)
class PartitionSpec:
    """What to create. The partition boots from the network (PXE) on its NIC ``mac``."""

    name: str
    cpus: int
    memory_mb: int
    mac: str | None = None


@dataclass(frozen=True)
class PartitionInfo:
    """A partition as the hypervisor reports it."""

    name: str
    state: str  # running, paused, stopped
    cpus: int
    memory_mb: int
    mac: str
    cpu_pinning: dict[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class HostInfo:
    """What a hypervisor host reports about itself."""

    hypervisor: str
    version: str
    cpus: int
    memory_mb: int
    free_memory_mb: int
    partitions: int


class HypervisorDriver(BaseDriver):
    """A hypervisor that runs partitions (VMs) on host resources."""

    @abc.abstractmethod
    def validate_host(self, host: HostTarget) -> None:
        """Check the host has what this driver needs (an address, ...). No I/O."""

    @abc.abstractmethod
    def host_info(self, host: HostTarget) -> HostInfo:
        """Report the host's hypervisor, capacity and use."""

    @abc.abstractmethod
    def list_partitions(self, host: HostTarget) -> list[PartitionInfo]:
        """Every partition defined on the host."""

    @abc.abstractmethod
    def get_partition(self, host: HostTarget, name: str) -> PartitionInfo:
        """One partition; :class:`qrm_core.errors.NotFound` if it does not exist."""

    @abc.abstractmethod
    def create_partition(self, host: HostTarget, spec: PartitionSpec) -> PartitionInfo:
        """Define a partition that network-boots; it is left stopped."""

    @abc.abstractmethod
    def start_partition(self, host: HostTarget, name: str) -> None:
        """Power the partition on."""

    @abc.abstractmethod
    def stop_partition(self, host: HostTarget, name: str, force: bool = False) -> None:
        """Power the partition off (``force``: pull the plug, used for fencing)."""

    @abc.abstractmethod
    def destroy_partition(self, host: HostTarget, name: str) -> None:
        """Stop the partition if needed and remove its definition."""

    @abc.abstractmethod
    def pause_partition(self, host: HostTarget, name: str) -> None:
        """Suspend a running partition in memory."""

    @abc.abstractmethod
    def unpause_partition(self, host: HostTarget, name: str) -> None:
        """Resume a paused partition."""

    @abc.abstractmethod
    def set_memory(self, host: HostTarget, name: str, memory_mb: int) -> None:
        """Change the partition's memory."""

    @abc.abstractmethod
    def set_vcpus(self, host: HostTarget, name: str, cpus: int) -> None:
        """Change the partition's number of virtual CPUs."""

    @abc.abstractmethod
    def pin_vcpus(self, host: HostTarget, name: str, pinning: dict[int, tuple[int, ...]]) -> None:
        """Pin each virtual CPU to a set of host CPUs (``{vcpu: (cpu, ...)}``)."""

    @abc.abstractmethod
    def migrate_partition(
        self, host: HostTarget, name: str, destination: HostTarget, live: bool = True
    ) -> None:
        """Move the partition to ``destination`` (same hypervisor)."""


def parse_pinning(text: str, vcpus: int, host_cpus: int) -> dict[int, tuple[int, ...]]:
    """Parse ``0:0-1,1:2`` style pinning (``vcpu:cpulist`` separated by ``;`` or ``/``).

    Accepted forms: ``"0:2;1:3"``, ``"0:0-3"``, ``"1:0,2"``. Raises ValueError
    with a one-line message.
    """
    result: dict[int, tuple[int, ...]] = {}
    for item in filter(None, (part.strip() for part in text.replace("/", ";").split(";"))):
        if ":" not in item:
            raise ValueError(f"pinning {item!r} is not VCPU:CPULIST")
        vcpu_text, cpulist = item.split(":", 1)
        if not vcpu_text.strip().isdigit():
            raise ValueError(f"virtual CPU {vcpu_text!r} is not a number")
        vcpu = int(vcpu_text)
        if vcpu >= vcpus:
            raise ValueError(f"virtual CPU {vcpu} does not exist (the partition has {vcpus})")
        cpus: set[int] = set()
        for chunk in cpulist.split(","):
            chunk = chunk.strip()
            if "-" in chunk:
                lo, _, hi = chunk.partition("-")
                if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                    raise ValueError(f"CPU range {chunk!r} is invalid")
                cpus.update(range(int(lo), int(hi) + 1))
            elif chunk.isdigit():
                cpus.add(int(chunk))
            else:
                raise ValueError(f"CPU {chunk!r} is not a number")
        bad = [c for c in cpus if c >= host_cpus]
        if bad:
            raise ValueError(f"host CPU {min(bad)} does not exist (the host has {host_cpus})")
        result[vcpu] = tuple(sorted(cpus))
    return result


def format_pinning(pinning: dict[int, tuple[int, ...]]) -> str:
    return ";".join(f"{vcpu}:{','.join(map(str, cpus))}" for vcpu, cpus in sorted(pinning.items()))
