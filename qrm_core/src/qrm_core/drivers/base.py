"""Driver interfaces: one abstract class per capability (Ironic's drivers/base.py shape).

Core knows a backend by name (a storage server's ``type``, a partition's
``hypervisor``) and loads exactly that driver through stevedore
(:meth:`qrm_core.plugins.PluginSystem.storage_driver` and ``hypervisor_driver``). Drivers receive plain value objects, never
database rows or sessions, so they can be tested against the real backend
alone. Every operation that changes something validates first: call
``validate_*`` (fast, no I/O) before acting, as Ironic does.

Each interface has required operations (abstract methods) and optional ones
(listed in ``OPTIONAL_OPERATIONS``): the base class implements an optional
operation by raising :class:`qrm_core.errors.UnsupportedOperation`, a driver
supports it by overriding it, and :meth:`BaseDriver.supported_operations`
tells core which it has (per host or server where that matters), so the CLI,
API and console offer only those. No driver writes stubs.

Errors: a driver raises :class:`qrm_core.errors.InvalidInput` for arguments it
cannot accept, :class:`qrm_core.errors.NotFound` for a partition or volume
that does not exist, :class:`qrm_core.errors.UnsupportedOperation` for an
optional operation it cannot do, and :class:`qrm_core.errors.DriverError`
when the backend refuses or fails.

``qrm_core.testing.conformance`` holds the test suite every driver runs
against its own backend.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from qrm_core.errors import InvalidInput, QrmError, UnsupportedOperation

if TYPE_CHECKING:
    from qrm_core.config import Settings


class BaseDriver(abc.ABC):
    """What every driver has.

    :cvar name: The entry-point name (``nfs``, ``xen``, ``fake``).
    :cvar description: One line for ``qrm plugins list``.
    :cvar OPTIONAL_OPERATIONS: The interface's optional operations (method
        names). The base class implements each by raising
        :class:`~qrm_core.errors.UnsupportedOperation`; a driver supports an
        operation by overriding it.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    OPTIONAL_OPERATIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def detect_missing_dependencies(self) -> list[str]:
        """Name what this driver needs but cannot find (commands, libraries).

        Cheap; called by ``qrm plugins list``. Empty means ready.
        """
        return []

    def supported_operations(self, target: object | None = None) -> frozenset[str]:
        """The optional operations this driver can perform (on ``target``, a
        host or storage server, when given).

        By default: every optional operation the driver's class overrides. A
        driver narrows it where support depends on the backend (a host whose
        hypervisor cannot live-migrate, a storage server without snapshots);
        no I/O beyond what the driver caches. Core offers, and the CLI, API
        and console show, only what this returns; the conformance kit checks
        that it tells the truth.
        """
        cls = type(self)
        return frozenset(
            op
            for op in self.OPTIONAL_OPERATIONS
            if getattr(cls, op, None) is not getattr(_interface_of(cls), op, None)
        )

    def unsupported(self, operation: str, where: str | None = None) -> UnsupportedOperation:
        """The error for an optional operation this driver cannot do (raise it)."""
        verb = OPERATION_VERBS.get(operation, operation.replace("_", " "))
        on = f" on {where}" if where else ""
        return UnsupportedOperation(f"{self.name}{on} cannot {verb}", driver=self.name, operation=operation)


def _interface_of(cls: type) -> type:
    """The interface class (StorageDriver, HypervisorDriver, PowerDriver) ``cls`` implements."""
    for base in cls.__mro__:
        if base in _INTERFACES:
            return base
    return BaseDriver


#: How each optional operation is named in an error ("xen on hv1 cannot pin CPUs").
OPERATION_VERBS: dict[str, str] = {
    "reboot_partition": "reboot partitions",
    "pause_partition": "pause partitions",
    "unpause_partition": "resume partitions",
    "set_memory": "change a partition's memory",
    "set_vcpus": "change a partition's virtual CPUs",
    "pin_vcpus": "pin CPUs",
    "migrate_partition": "migrate partitions",
    "snapshot_partition": "snapshot partitions",
    "revert_partition": "revert partitions to a snapshot",
    "remove_partition_snapshot": "remove partition snapshots",
    "list_partition_snapshots": "list partition snapshots",
    "list_volumes": "list volumes",
    "capacity": "report its capacity",
    "clone_volume": "clone volumes",
    "snapshot_volume": "snapshot volumes",
    "list_snapshots": "list volume snapshots",
    "revert_volume": "revert volumes to a snapshot",
    "remove_snapshot": "remove volume snapshots",
    "open_tree": "fill volumes with files",
    "close_tree": "fill volumes with files",
    "read_tree": "give volumes' files to copy",
    "reset": "reset machines",
}


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageTarget:
    """A storage server as a driver sees it.

    :ivar settings: Per-server driver settings (``qrm storage set``), strings.
    """

    name: str
    type: str
    address: str
    comment: str = ""
    settings: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportClient:
    """The machine a volume is exported to.

    :ivar initiator: The stable iSCSI initiator name qrm gives this machine
        (``iqn.2026-12.org.qrm:<mac>``), for drivers that grant access by it.
    """

    mac: str
    ip: str | None
    hostname: str | None = None
    initiator: str | None = None


@dataclass(frozen=True)
class VolumeInfo:
    """A volume on a storage server.

    :ivar how: For a volume just made from another (``clone_volume``): how the
        data came over, for people (``copy-on-write``, ``full copy``).
    """

    location: str
    size_mb: int | None = None
    exported_to: tuple[str, ...] = ()
    how: str = ""


@dataclass(frozen=True)
class RootSpec:
    """How a booting machine finds its root filesystem on this storage.

    :ivar kernel_args: Arguments for the kernel command line (``root=...``),
        each a single whitespace-free token. Every user of the booted machine
        can read them: never put a secret here.
    :ivar description: One line for people (``nfs 10.0.11.35:/exports/web``).
    :ivar kind: The kind of root (``archive``, ``nfs``, ``iscsi``, ...), for
        the agent and for people; empty when the kernel arguments say it all.
    :ivar options: Further non-secret facts the booting agent needs.
    :ivar secrets: Credentials the agent needs to mount the root (CHAP user
        and secret): handed to the agent over its authenticated channel only,
        never written to a log, an event, the kernel command line or JSON
        output. Not shown by ``repr``.
    """

    kernel_args: tuple[str, ...]
    description: str
    kind: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class CapacityInfo:
    """What a storage server holds and has free (MB)."""

    total_mb: int
    free_mb: int
    volumes: int


@dataclass(frozen=True)
class ExportRequest:
    """One export (or withdrawal) in a batch: ``location`` to ``client``."""

    location: str
    client: ExportClient


@dataclass(frozen=True)
class ExportOutcome:
    """What happened to one :class:`ExportRequest`: ``error`` is None when it was done."""

    request: ExportRequest
    error: QrmError | None = None


class StorageDriver(BaseDriver):
    """A kind of storage server: exports volumes that hold filesystem images.

    :cvar copies_per_machine: True when each machine gets a copy of its own of
        an image (an archive unpacked into RAM): nothing one machine writes
        reaches another, so VEs may share the image whatever their
        deployment. False (the default) for volumes the machines mount from
        the server (NFS, iSCSI): then no two VEs share an image that one of
        them mounts read-write.
    """

    copies_per_machine: ClassVar[bool] = False

    OPTIONAL_OPERATIONS = (
        "list_volumes",
        "capacity",
        "clone_volume",
        "snapshot_volume",
        "list_snapshots",
        "revert_volume",
        "remove_snapshot",
        "open_tree",
        "close_tree",
        "read_tree",
    )

    @abc.abstractmethod
    def validate_server(self, storage: StorageTarget) -> None:
        """Check that ``storage`` is usable by this driver (address format, comment). No I/O."""

    @abc.abstractmethod
    def validate_location(self, storage: StorageTarget, location: str) -> None:
        """Check that ``location`` names a volume this driver understands
        (an export path, an iSCSI target name). Fast: no network I/O (a
        driver managing local storage may look at local paths)."""

    def check_server(self, storage: StorageTarget) -> None:
        """Check that the server can be reached and managed (I/O allowed;
        called by ``qrm storage add`` with no database transaction open).
        Raise :class:`~qrm_core.errors.DriverError` saying what is wrong. The
        default checks nothing."""

    def export_readiness(self, storage: StorageTarget) -> str | None:
        """Why machines cannot have volumes of ``storage`` exported to them now
        (a dependency missing, nothing configured on this host), in one line;
        None when they can. Cheap, no network I/O: ``qrm storage add`` warns with
        it and ``qrm ve start`` refuses with it. The default: ready."""
        return None

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

    def export_volumes(
        self, storage: StorageTarget, requests: Sequence[ExportRequest]
    ) -> list[ExportOutcome]:
        """Export many volumes at once; one outcome per request, in order.

        The default calls :meth:`export_volume` for each; a driver whose
        server applies changes with a reload overrides it to reload once.
        One failing request must not stop the others.
        """
        return [self._one(self.export_volume, storage, request) for request in requests]

    def unexport_volumes(
        self, storage: StorageTarget, requests: Sequence[ExportRequest]
    ) -> list[ExportOutcome]:
        """Withdraw many exports at once (as :meth:`export_volumes`)."""
        return [self._one(self.unexport_volume, storage, request) for request in requests]

    @staticmethod
    def _one(call: Callable[..., None], storage: StorageTarget, request: ExportRequest) -> ExportOutcome:
        try:
            call(storage, request.location, request.client)
        except QrmError as exc:
            return ExportOutcome(request, exc)
        return ExportOutcome(request)

    @abc.abstractmethod
    def describe_root(
        self,
        storage: StorageTarget,
        location: str,
        client: ExportClient | None = None,
        *,
        shared: bool = False,
    ) -> RootSpec:
        """Say how ``client`` (None: any machine) boots with this volume as
        its root filesystem. ``shared``: many machines boot it at once (a
        shared pool), so it is mounted read-only with a per-machine writable
        overlay."""

    # -- optional ----------------------------------------------------------

    def list_volumes(self, storage: StorageTarget) -> list[VolumeInfo]:
        """The volumes on the server."""
        raise self.unsupported("list_volumes", storage.name)

    def capacity(self, storage: StorageTarget) -> CapacityInfo:
        """How much the server holds and has free."""
        raise self.unsupported("capacity", storage.name)

    def clone_volume(self, storage: StorageTarget, location: str, name: str) -> VolumeInfo:
        """A new volume named after ``name`` with a copy of ``location``'s data
        (copy-on-write where the backend can; say which in ``VolumeInfo.how``).
        A missing ``location`` is :class:`~qrm_core.errors.NotFound`."""
        raise self.unsupported("clone_volume", storage.name)

    def snapshot_volume(self, storage: StorageTarget, location: str, label: str) -> str | None:
        """Keep the volume's current data under ``label``; return how (``copy-on-write``,
        ``full copy``) for people, or None. A label taken already is a DriverError."""
        raise self.unsupported("snapshot_volume", storage.name)

    def list_snapshots(self, storage: StorageTarget, location: str) -> list[str]:
        """The labels of the volume's snapshots, oldest first."""
        raise self.unsupported("list_snapshots", storage.name)

    def revert_volume(self, storage: StorageTarget, location: str, label: str) -> str | None:
        """Put the volume's data back as it was when ``label`` was taken (the snapshot
        stays); return how, or None. Core calls it only while no machine uses the volume."""
        raise self.unsupported("revert_volume", storage.name)

    def remove_snapshot(self, storage: StorageTarget, location: str, label: str) -> None:
        """Forget the snapshot ``label``."""
        raise self.unsupported("remove_snapshot", storage.name)

    def open_tree(self, storage: StorageTarget, location: str) -> str:
        """A directory on the storage server's machine (where
        :func:`qrm_core.remote.storage_runner` runs commands) that files for the
        volume go into: a capture rsyncs into it, an import unpacks into it.
        The volume itself where it is a directory (NFS); otherwise a staging
        directory the driver keeps until :meth:`close_tree`, so a fill that was
        interrupted resumes where it stopped. Must exist when this returns."""
        raise self.unsupported("open_tree", storage.name)

    def read_tree(self, storage: StorageTarget, location: str) -> str:
        """A directory on the storage server's machine (where
        :func:`qrm_core.remote.storage_runner` runs commands) that holds the
        volume's files as they are now, for core to read and copy elsewhere (a
        clone onto another storage server). Core only reads it, and only while no
        machine uses the volume. A missing ``location`` is :class:`~qrm_core.errors.NotFound`.
        Core calls :meth:`release_tree` when it has finished reading."""
        raise self.unsupported("read_tree", storage.name)

    def release_tree(self, storage: StorageTarget, location: str, tree: str) -> None:
        """Core has finished reading ``tree``, which :meth:`read_tree` gave for
        ``location``, whether the copy worked or failed: undo what read_tree did
        to give it (unmount a filesystem it mounted). Called once for every
        read_tree that returned, with no database transaction open. Idempotent.
        The default: nothing to do (the tree is the volume itself)."""

    def close_tree(self, storage: StorageTarget, location: str, tree: str) -> str:
        """Make the files put into ``tree`` (from :meth:`open_tree`) the volume's
        data (an ext4 filesystem built from them for a block volume; nothing
        more for a directory) and return one line saying what was done. A
        volume too small for the files is a DriverError saying so."""
        raise self.unsupported("close_tree", storage.name)


# ---------------------------------------------------------------------------
# Hypervisors (partitioning)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HostTarget:
    """A resource that hosts partitions, as a hypervisor driver sees it.

    :ivar uri: How to reach the host's hypervisor (a libvirt URI, a vCenter
        host reference); None: the driver's default, built from ``address``.
    :ivar network: The provisioning network the partitions' NIC joins (a
        bridge, a port group); None: the driver's default.
    :ivar settings: Other per-host driver settings (strings).
    """

    resource_id: int
    mac: str
    address: str | None
    hostname: str | None
    cpus: int
    memory_mb: int
    uri: str | None = None
    network: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How people know the host (its hostname, else its MAC)."""
        return self.hostname or self.mac


@dataclass(frozen=True)
class PartitionSpec:
    """What to create. The partition boots from the network (PXE) on its NIC ``mac``.

    :ivar max_cpus: Virtual CPUs it may grow to while running (hot-add); None: ``cpus``.
    :ivar max_memory_mb: Memory it may grow to while running (balloon); None: ``memory_mb``.
    :ivar network: The network its NIC joins; None: the host's.
    """

    name: str
    cpus: int
    memory_mb: int
    mac: str | None = None
    max_cpus: int | None = None
    max_memory_mb: int | None = None
    network: str | None = None


@dataclass(frozen=True)
class PartitionInfo:
    """A partition as the hypervisor reports it."""

    name: str
    state: str  # running, paused, stopped
    cpus: int
    memory_mb: int
    mac: str
    cpu_pinning: dict[int, tuple[int, ...]] = field(default_factory=dict)
    max_cpus: int | None = None
    max_memory_mb: int | None = None


@dataclass(frozen=True)
class HostInfo:
    """What a hypervisor host reports about itself."""

    hypervisor: str
    version: str
    cpus: int
    memory_mb: int
    free_memory_mb: int
    partitions: int


#: The states a driver reports for a partition.
PARTITION_STATES = ("running", "paused", "stopped")


class HypervisorDriver(BaseDriver):
    """A hypervisor that runs partitions (VMs) on host resources."""

    OPTIONAL_OPERATIONS = (
        "reboot_partition",
        "pause_partition",
        "unpause_partition",
        "set_memory",
        "set_vcpus",
        "pin_vcpus",
        "migrate_partition",
        "snapshot_partition",
        "revert_partition",
        "remove_partition_snapshot",
        "list_partition_snapshots",
    )

    @abc.abstractmethod
    def validate_host(self, host: HostTarget) -> None:
        """Check the host has what this driver needs (an address, a usable URI). No I/O."""

    def validate_partition(self, host: HostTarget, spec: PartitionSpec) -> None:
        """Check a partition before it is created (name alphabet, sizes, MAC). No I/O.

        The default checks what every backend needs: a name of letters,
        digits, ``.``, ``_`` and ``-`` (at most 64), at least one CPU and one
        MB, maxima not below the sizes, and a unicast MAC if one is given. A
        driver extends it with its own limits.
        """
        if not _PARTITION_NAME.fullmatch(spec.name):
            raise InvalidInput(
                f"partition name {spec.name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if spec.cpus < 1 or spec.memory_mb < 1:
            raise InvalidInput("a partition needs at least 1 CPU and 1 MB of memory")
        if spec.max_cpus is not None and spec.max_cpus < spec.cpus:
            raise InvalidInput(f"maximum CPUs {spec.max_cpus} is below the {spec.cpus} CPUs asked for")
        if spec.max_memory_mb is not None and spec.max_memory_mb < spec.memory_mb:
            raise InvalidInput(
                f"maximum memory {spec.max_memory_mb} MB is below the {spec.memory_mb} MB asked for"
            )
        if spec.mac is not None and not _UNICAST_MAC.fullmatch(spec.mac.lower()):
            raise InvalidInput(f"MAC {spec.mac!r} is not a unicast MAC address (aa:bb:cc:dd:ee:ff)")

    @abc.abstractmethod
    def host_info(self, host: HostTarget) -> HostInfo:
        """Report the host's hypervisor, capacity and use."""

    @abc.abstractmethod
    def list_partitions(self, host: HostTarget) -> list[PartitionInfo]:
        """Every partition defined on the host (one sweep of the backend, not one call per partition)."""

    @abc.abstractmethod
    def get_partition(self, host: HostTarget, name: str) -> PartitionInfo:
        """One partition; :class:`qrm_core.errors.NotFound` if it does not exist."""

    @abc.abstractmethod
    def create_partition(self, host: HostTarget, spec: PartitionSpec) -> PartitionInfo:
        """Define a partition that network-boots; it is left stopped.

        A partition of that name existing already is a
        :class:`~qrm_core.errors.DriverError`; nothing is left half made when
        creation fails."""

    @abc.abstractmethod
    def start_partition(self, host: HostTarget, name: str) -> None:
        """Power the partition on. Starting a running partition does nothing."""

    @abc.abstractmethod
    def stop_partition(self, host: HostTarget, name: str, force: bool = False) -> None:
        """Power the partition off: ask its OS (ACPI) and wait a little, then
        pull the plug; ``force`` pulls it at once (fencing). Stopping a stopped
        partition does nothing."""

    @abc.abstractmethod
    def destroy_partition(self, host: HostTarget, name: str) -> None:
        """Stop the partition if needed and remove its definition;
        :class:`~qrm_core.errors.NotFound` if it does not exist."""

    # -- optional ----------------------------------------------------------

    def reboot_partition(self, host: HostTarget, name: str) -> None:
        """Reset a running partition (it boots again from the network)."""
        raise self.unsupported("reboot_partition", host.label)

    def pause_partition(self, host: HostTarget, name: str) -> None:
        """Suspend a running partition in memory."""
        raise self.unsupported("pause_partition", host.label)

    def unpause_partition(self, host: HostTarget, name: str) -> None:
        """Resume a paused partition."""
        raise self.unsupported("unpause_partition", host.label)

    def set_memory(
        self, host: HostTarget, name: str, memory_mb: int, *, live: bool = True, persistent: bool = True
    ) -> None:
        """Change the partition's memory: ``live`` in the running partition
        (within its maximum), ``persistent`` in its definition (from its next
        start). A stopped partition takes only the persistent change."""
        raise self.unsupported("set_memory", host.label)

    def set_vcpus(
        self, host: HostTarget, name: str, cpus: int, *, live: bool = True, persistent: bool = True
    ) -> None:
        """Change the partition's number of virtual CPUs (``live`` and
        ``persistent`` as for :meth:`set_memory`)."""
        raise self.unsupported("set_vcpus", host.label)

    def pin_vcpus(
        self,
        host: HostTarget,
        name: str,
        pinning: dict[int, tuple[int, ...]],
        *,
        live: bool = True,
        persistent: bool = True,
    ) -> None:
        """Pin each virtual CPU to a set of host CPUs (``{vcpu: (cpu, ...)}``);
        virtual CPUs not named keep their pinning."""
        raise self.unsupported("pin_vcpus", host.label)

    def migrate_partition(
        self, host: HostTarget, name: str, destination: HostTarget, live: bool = True
    ) -> None:
        """Move the partition to ``destination`` (same hypervisor); ``live``
        keeps it running throughout. Afterwards it is defined on the
        destination only."""
        raise self.unsupported("migrate_partition", host.label)

    def snapshot_partition(self, host: HostTarget, name: str, label: str) -> None:
        """Keep the partition's disks (and, where the backend can, memory) under ``label``."""
        raise self.unsupported("snapshot_partition", host.label)

    def revert_partition(self, host: HostTarget, name: str, label: str) -> None:
        """Put the partition back as it was when ``label`` was taken."""
        raise self.unsupported("revert_partition", host.label)

    def remove_partition_snapshot(self, host: HostTarget, name: str, label: str) -> None:
        """Forget the snapshot ``label``."""
        raise self.unsupported("remove_partition_snapshot", host.label)

    def list_partition_snapshots(self, host: HostTarget, name: str) -> list[str]:
        """The labels of the partition's snapshots, oldest first."""
        raise self.unsupported("list_partition_snapshots", host.label)


# ---------------------------------------------------------------------------
# Power (machines that are not VMs)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerTarget:
    """A machine's power controller (a BMC, a switched PDU outlet), as a power driver sees it.

    :ivar address: Where the controller is (a BMC's address, an outlet).
    :ivar password: The controller's secret; never logged or shown (not in ``repr``).
    :ivar settings: Other per-machine driver settings (strings).
    """

    resource_id: int
    mac: str
    address: str | None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    settings: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.address or self.mac


#: The power states a driver reports.
POWER_STATES = ("on", "off", "unknown")


class PowerDriver(BaseDriver):
    """Turns machines that are not VMs on and off (IPMI, Redfish, a PDU): what
    fences a failed physical machine."""

    OPTIONAL_OPERATIONS = ("reset",)

    @abc.abstractmethod
    def validate(self, target: PowerTarget) -> None:
        """Check the controller's address and credentials are usable. No I/O."""

    @abc.abstractmethod
    def power_on(self, target: PowerTarget) -> None:
        """Turn the machine on. Idempotent."""

    @abc.abstractmethod
    def power_off(self, target: PowerTarget, force: bool = True) -> None:
        """Turn the machine off: ``force`` cuts power at once (fencing), else
        the OS is asked to shut down. Idempotent."""

    @abc.abstractmethod
    def power_state(self, target: PowerTarget) -> str:
        """``on``, ``off`` or ``unknown`` (the controller answered but cannot tell)."""

    def reset(self, target: PowerTarget) -> None:
        """Hard-reset a machine that is on."""
        raise self.unsupported("reset", target.label)


_INTERFACES: tuple[type[BaseDriver], ...] = (StorageDriver, HypervisorDriver, PowerDriver)
_PARTITION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UNICAST_MAC = re.compile(r"[0-9a-f][02468ace](:[0-9a-f]{2}){5}")


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
