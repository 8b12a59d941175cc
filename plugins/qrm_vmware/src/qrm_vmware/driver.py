"""The ``vmware`` hypervisor driver: partitions are VMs on ESXi hosts, through vCenter.

What maps to what:

===================  ==========================================================
qrm                  vSphere
===================  ==========================================================
host resource        an ESXi host (``HostSystem``) or a cluster (vCenter
                     places each VM), named by ``vmware://CONN/KIND/MOID``
partition            a VM without disks whose first boot device is its NIC
                     (vmxnet3 by default) on the host's provisioning port
                     group, with qrm's MAC (``addressType=manual``); marked
                     in its notes (:mod:`qrm_vmware.refs`)
start / stop         PowerOnVM / ShutdownGuest then PowerOffVM (force: at once)
reboot               ResetVM (power off, apply what waits, power on if
                     something waits for the next power-on)
pause / resume       SuspendVM / PowerOnVM
memory, vCPUs        ReconfigVM: live where hot-add allows it (qrm enables
                     hot-add on its VMs; vSphere adds, never removes, memory
                     while running), otherwise at the next power-on through
                     qrm (kept in the VM's notes until then)
pinning              ``config.cpuAffinity``: one set of host CPUs for all of
                     the VM's vCPUs (vSphere has no per-vCPU pinning); not
                     in a cluster (DRS moves VMs)
migrate              MigrateVM: vMotion when running (live), else cold
snapshots            CreateSnapshot (without memory: a revert leaves the VM
                     off, and it boots again from the network), Revert,
                     Remove; labels are snapshot names, unique per VM
===================  ==========================================================

Every inventory read is one PropertyCollector call (a traversal from the host
or cluster); every change is one vCenter task, waited for with a timeout and
reported in one line when it fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pyVmomi import vim, vmodl

from qrm_core.plugin_api import (
    DriverError,
    HostInfo,
    HostTarget,
    HypervisorDriver,
    InvalidInput,
    NotFound,
    PartitionInfo,
    PartitionSpec,
    QrmError,
)
from qrm_vmware import refs, vsphere
from qrm_vmware.connections import Connection, ConnectionStore
from qrm_vmware.refs import HostRef, Marker
from qrm_vmware.settings import VmwareSettings
from qrm_vmware.settings import load as load_settings

T = TypeVar("T")
PC = vmodl.query.PropertyCollector

STATES = {"poweredOn": "running", "poweredOff": "stopped", "suspended": "paused"}
NIC_TYPES: dict[str, Any] = {
    "vmxnet3": vim.vm.device.VirtualVmxnet3,
    "e1000e": vim.vm.device.VirtualE1000e,
    "e1000": vim.vm.device.VirtualE1000,
}
HOST_SETTINGS = ("datastore", "folder", "nic", "guest_id")
VM_PATHS = (
    "name",
    "config.annotation",
    "config.template",
    "runtime.powerState",
    "runtime.host",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.cpuAffinity",
    "config.memoryHotAddEnabled",
    "config.cpuHotAddEnabled",
    "config.cpuHotRemoveEnabled",
)
SNAPSHOT_PREFIX = ""


@dataclass(frozen=True)
class Vm:
    """One of qrm's VMs as the PropertyCollector returned it."""

    ref: Any
    name: str
    marker: Marker
    power: str
    host_moid: str
    cpus: int
    memory_mb: int
    affinity: tuple[int, ...]
    memory_hot_add: bool
    cpu_hot_add: bool
    cpu_hot_remove: bool
    template: bool

    @classmethod
    def from_obj(cls, obj: vsphere.Obj) -> Vm | None:
        marker = refs.parse_marker(obj.get("config.annotation"))
        if marker is None:
            return None
        affinity = obj.get("config.cpuAffinity")
        host = obj.get("runtime.host")
        return cls(
            ref=obj.ref,
            name=str(obj.get("name", "")),
            marker=marker,
            power=str(obj.get("runtime.powerState", "poweredOff")),
            host_moid=str(host._moId) if host is not None else "",
            cpus=int(obj.get("config.hardware.numCPU") or 0),
            memory_mb=int(obj.get("config.hardware.memoryMB") or 0),
            affinity=tuple(sorted(affinity.affinitySet or ())) if affinity is not None else (),
            memory_hot_add=bool(obj.get("config.memoryHotAddEnabled")),
            cpu_hot_add=bool(obj.get("config.cpuHotAddEnabled")),
            cpu_hot_remove=bool(obj.get("config.cpuHotRemoveEnabled")),
            template=bool(obj.get("config.template")),
        )

    @property
    def state(self) -> str:
        return STATES.get(self.power, "stopped")

    def info(self) -> PartitionInfo:
        pinning = {v: self.affinity for v in range(self.cpus)} if self.affinity else {}
        return PartitionInfo(
            name=self.marker.partition,
            state=self.state,
            cpus=self.cpus,
            memory_mb=self.memory_mb,
            mac=self.marker.mac,
            cpu_pinning=pinning,
        )


def _vm_traversal(ref: HostRef) -> list[Any]:
    to_vms = PC.TraversalSpec(name="host-vms", type=vim.HostSystem, path="vm")
    if ref.is_cluster:
        return [
            PC.TraversalSpec(
                name="cluster-hosts", type=vim.ClusterComputeResource, path="host", selectSet=[to_vms]
            )
        ]
    return [to_vms]


class VmwareHypervisor(HypervisorDriver):
    name = "vmware"
    description = "VMware vSphere: partitions are VMs on ESXi hosts, through vCenter (pyVmomi)"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self._vmware: VmwareSettings | None = None
        self._lock = threading.Lock()
        #: (connection, host or cluster moid, partition) -> the VM's moid, as last seen
        self._known: dict[tuple[str, str, str], str] = {}

    # -- plumbing ----------------------------------------------------------

    @property
    def vmware(self) -> VmwareSettings:
        if self._vmware is None:
            self._vmware = load_settings()
        return self._vmware

    def _connection(self, name: str) -> Connection:
        return ConnectionStore(self.settings, self.vmware).read(self.settings, name)

    def _run(self, ref: HostRef, fn: Callable[[vsphere.Session], T]) -> T:
        return vsphere.POOL.run(self._connection(ref.connection), self.vmware, fn)

    def _ref(self, host: HostTarget) -> HostRef:
        return refs.parse_host_uri(host.uri, f"host {host.label}")

    @staticmethod
    def _moref(kind: type, moid: str, session: vsphere.Session) -> Any:
        return kind(moid, session.si._stub)

    def _host_object(self, ref: HostRef, session: vsphere.Session) -> Any:
        kind = vim.ClusterComputeResource if ref.is_cluster else vim.HostSystem
        return self._moref(kind, ref.moid, session)

    def _vms(self, session: vsphere.Session, ref: HostRef, label: str) -> list[Vm]:
        """qrm's VMs on the host (or in the cluster): one PropertyCollector call."""
        host_kind = vim.ClusterComputeResource if ref.is_cluster else vim.HostSystem
        found = self._retrieve_from_host(
            session,
            ref,
            [(host_kind, ["name"]), (vim.VirtualMachine, VM_PATHS)],
            _vm_traversal(ref),
            what=f"the VMs of {label}",
        )
        if not any(o.kind == ref.kind and o.moid == ref.moid for o in found):
            raise NotFound(f"vCenter {ref.connection} no longer has {label} ({ref.kind} {ref.moid})")
        return [
            vm
            for vm in (Vm.from_obj(o) for o in found if o.kind == "VirtualMachine")
            if vm is not None and vm.marker.belongs_to(ref)
        ]

    def _retrieve_from_host(
        self,
        session: vsphere.Session,
        ref: HostRef,
        kinds: Any,
        traversal: Any = (),
        *,
        skip: bool = False,
        what: str,
    ) -> list[vsphere.Obj]:
        """A retrieval starting at the host (or cluster); a host vCenter no longer has gives nothing."""
        try:
            return session.retrieve_objects(
                [self._host_object(ref, session)], kinds, traversal, skip=skip, what=what
            )
        except NotFound:
            return []

    def _vm(self, session: vsphere.Session, host: HostTarget, name: str) -> Vm:
        """The VM of partition ``name`` on ``host``.

        One call either way: the VM qrm last knew for it (its properties, by
        reference, checked to still be that partition there), else every VM
        of the host (and the references of all of them are remembered)."""
        ref = self._ref(host)
        key = (ref.connection, ref.moid, name)
        known = self._known.get(key)
        if known is not None:
            try:
                found = session.retrieve_objects(
                    [self._moref(vim.VirtualMachine, known, session)],
                    [(vim.VirtualMachine, VM_PATHS)],
                    what=f"partition {name}",
                )
            except NotFound:
                found = []
            vm = Vm.from_obj(found[0]) if found else None
            if (
                vm is not None
                and vm.marker.partition == name
                and not vm.marker.creating
                and vm.marker.belongs_to(ref)
                and (ref.is_cluster or vm.host_moid == ref.moid)
            ):
                return vm
            self._known.pop(key, None)
        vms = self._vms(session, ref, f"host {host.label}")
        for vm in vms:
            if not vm.marker.creating:
                self._known[(ref.connection, ref.moid, vm.marker.partition)] = str(vm.ref._moId)
        found_vms = [vm for vm in vms if vm.marker.partition == name and not vm.marker.creating]
        if not found_vms:
            self._known.pop(key, None)
            raise NotFound(f"partition {name!r} does not exist on host {host.label}")
        if len(found_vms) > 1:
            self._known.pop(key, None)
            raise DriverError(
                f"{len(found_vms)} VMs are partition {name} on host {host.label} "
                f"({', '.join(vm.name for vm in found_vms)}): one came by vMotion; move or remove it in vCenter"
            )
        return found_vms[0]

    def _task(self, session: vsphere.Session, what: str, start: Callable[[], Any]) -> Any:
        task = session.call(what, start)
        return session.wait(task, what)

    # -- validation (no I/O) -------------------------------------------------

    def validate_host(self, host: HostTarget) -> None:
        self._ref(host)
        unknown = sorted(set(host.settings) - set(HOST_SETTINGS))
        if unknown:
            raise InvalidInput(
                f"host {host.label}: unknown vmware host setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(HOST_SETTINGS)}"
            )
        nic = host.settings.get("nic")
        if nic is not None and nic not in NIC_TYPES:
            raise InvalidInput(f"host {host.label}: nic={nic!r}: use one of {', '.join(NIC_TYPES)}")
        for key in ("datastore", "folder", "guest_id"):
            value = host.settings.get(key)
            if value is not None and (not value or len(value) > 80 or any(c in value for c in "\n\r\t[]")):
                raise InvalidInput(f"host {host.label}: {key}={value!r} is not a usable vSphere name")
        network = host.network
        if network is not None and (not network or len(network) > 80 or "\n" in network):
            raise InvalidInput(f"host {host.label}: {network!r} is not a usable port group name")

    def validate_partition(self, host: HostTarget, spec: PartitionSpec) -> None:
        super().validate_partition(host, spec)
        if spec.cpus > 768:
            raise InvalidInput(f"a vSphere VM has at most 768 virtual CPUs, not {spec.cpus}")
        if spec.memory_mb < 4 or spec.memory_mb % 4:
            raise InvalidInput(
                f"vSphere needs VM memory in multiples of 4 MB (at least 4), not {spec.memory_mb}"
            )
        if spec.max_memory_mb is not None and spec.max_memory_mb % 4:
            raise InvalidInput(f"vSphere needs VM memory in multiples of 4 MB, not {spec.max_memory_mb}")

    def supported_operations(self, target: object | None = None) -> frozenset[str]:
        supported = super().supported_operations(target)
        if isinstance(target, HostTarget) and target.uri:
            try:
                ref = self._ref(target)
            except InvalidInput:
                return supported
            if ref.is_cluster:
                # DRS moves a cluster's VMs between hosts: CPU affinity to one host's CPUs cannot hold.
                supported -= {"pin_vcpus"}
        return supported

    # -- host ------------------------------------------------------------------

    def host_info(self, host: HostTarget) -> HostInfo:
        ref = self._ref(host)

        def run(session: vsphere.Session) -> HostInfo:
            host_paths = [
                "name",
                "runtime.connectionState",
                "summary.hardware.numCpuThreads",
                "summary.hardware.memorySize",
                "summary.quickStats.overallMemoryUsage",
                "summary.config.product.fullName",
                "summary.config.product.version",
            ]
            traversal = (
                [
                    PC.TraversalSpec(
                        name="cluster-hosts",
                        type=vim.ClusterComputeResource,
                        path="host",
                        selectSet=[PC.TraversalSpec(name="host-vms", type=vim.HostSystem, path="vm")],
                    )
                ]
                if ref.is_cluster
                else [PC.TraversalSpec(name="host-vms", type=vim.HostSystem, path="vm")]
            )
            found = self._retrieve_from_host(
                session,
                ref,
                [(vim.HostSystem, host_paths), (vim.VirtualMachine, ["config.annotation"])],
                traversal,
                skip=ref.is_cluster,
                what=f"host {host.label}",
            )
            hosts = [o for o in found if o.kind == "HostSystem"]
            if not hosts:
                raise NotFound(
                    f"vCenter {ref.connection} no longer has host {host.label} ({ref.kind} {ref.moid})"
                )
            live = [h for h in hosts if h.get("runtime.connectionState") == "connected"]
            cpus = sum(int(h.get("summary.hardware.numCpuThreads") or 0) for h in live)
            memory = sum(int(h.get("summary.hardware.memorySize") or 0) for h in live) // (1024 * 1024)
            used = sum(int(h.get("summary.quickStats.overallMemoryUsage") or 0) for h in live)
            partitions = sum(
                1
                for o in found
                if o.kind == "VirtualMachine" and refs.parse_marker(o.get("config.annotation"))
            )
            version = str(hosts[0].get("summary.config.product.version") or "")
            return HostInfo(
                hypervisor="vmware",
                version=version,
                cpus=cpus,
                memory_mb=memory,
                free_memory_mb=max(memory - used, 0),
                partitions=partitions,
            )

        return self._run(ref, run)

    def list_partitions(self, host: HostTarget) -> list[PartitionInfo]:
        ref = self._ref(host)
        return self._run(
            ref,
            lambda s: sorted(
                (vm.info() for vm in self._vms(s, ref, f"host {host.label}") if not vm.marker.creating),
                key=lambda p: p.name,
            ),
        )

    def get_partition(self, host: HostTarget, name: str) -> PartitionInfo:
        ref = self._ref(host)
        return self._run(ref, lambda s: self._vm(s, host, name).info())

    # -- create / destroy ------------------------------------------------------

    def create_partition(self, host: HostTarget, spec: PartitionSpec) -> PartitionInfo:
        self.validate_host(host)
        self.validate_partition(host, spec)
        ref = self._ref(host)
        return self._run(ref, lambda s: self._create(s, host, ref, spec))

    def _placement(self, session: vsphere.Session, host: HostTarget, ref: HostRef) -> dict[str, Any]:
        """Where a new VM goes, and the VMs there: one PropertyCollector call."""
        up = PC.TraversalSpec(
            name="up", type=vim.ManagedEntity, path="parent", selectSet=[PC.SelectionSpec(name="up")]
        )
        host_vms = PC.TraversalSpec(name="host-vms", type=vim.HostSystem, path="vm")
        host_ds = PC.TraversalSpec(name="host-ds", type=vim.HostSystem, path="datastore")
        host_net = PC.TraversalSpec(name="host-net", type=vim.HostSystem, path="network")
        if ref.is_cluster:
            select = [
                up,
                PC.TraversalSpec(name="cluster-ds", type=vim.ComputeResource, path="datastore"),
                PC.TraversalSpec(name="cluster-net", type=vim.ComputeResource, path="network"),
                PC.TraversalSpec(
                    name="cluster-hosts", type=vim.ClusterComputeResource, path="host", selectSet=[host_vms]
                ),
            ]
        else:
            select = [up, host_vms, host_ds, host_net]
        found = self._retrieve_from_host(
            session,
            ref,
            [
                (vim.HostSystem, ["name", "parent"]),
                (vim.ComputeResource, ["resourcePool"]),
                (vim.Datacenter, ["vmFolder", "name"]),
                (vim.Folder, ["name"]),
                (vim.Datastore, ["name", "summary.freeSpace", "summary.accessible"]),
                (vim.Network, ["name"]),
                (vim.dvs.DistributedVirtualPortgroup, ["name", "key", "config.distributedVirtualSwitch"]),
                (vim.VirtualMachine, ["name", "config.annotation"]),
            ],
            select,
            what=f"the placement of a VM on {host.label}",
        )
        by_kind: dict[str, list[vsphere.Obj]] = {}
        for obj in found:
            by_kind.setdefault(obj.kind, []).append(obj)
        return {"objects": found, "by_kind": by_kind}

    def _pick(
        self, session: vsphere.Session, host: HostTarget, ref: HostRef, spec: PartitionSpec
    ) -> dict[str, Any]:
        placed = self._placement(session, host, ref)
        kinds: dict[str, list[vsphere.Obj]] = placed["by_kind"]
        label = host.label
        me = [
            o
            for o in kinds.get("ClusterComputeResource" if ref.is_cluster else "HostSystem", [])
            if o.moid == ref.moid
        ]
        if not me:
            raise NotFound(f"vCenter {ref.connection} no longer has host {label} ({ref.kind} {ref.moid})")
        for obj in kinds.get("VirtualMachine", []):
            marker = refs.parse_marker(obj.get("config.annotation"))
            if marker is None or marker.partition != spec.name or not marker.belongs_to(ref):
                continue
            if not marker.creating:
                raise DriverError(
                    f"partition {spec.name!r} already exists on host {label} (VM {obj.get('name')})"
                )
            # Left half made by an earlier try that could not remove it: remove it now.
            left = self._destroy_vm(session, obj.ref, str(obj.get("name")))
            if left is not None:
                raise DriverError(
                    f"a half-made VM {obj.get('name')} of an earlier try is in the way on {label}: {left}"
                )
        # resource pool: the compute resource's root pool
        if ref.is_cluster:
            pool = me[0].get("resourcePool")
            host_obj = None
        else:
            parent = me[0].get("parent")
            owners = [
                o
                for o in kinds.get("ComputeResource", []) + kinds.get("ClusterComputeResource", [])
                if parent is not None and o.moid == parent._moId
            ]
            pool = owners[0].get("resourcePool") if owners else None
            host_obj = me[0].ref
        if pool is None:
            raise DriverError(f"host {label} has no resource pool in vCenter {ref.connection}")
        datacenters = kinds.get("Datacenter", [])
        if not datacenters:
            raise DriverError(f"host {label} is in no datacenter of vCenter {ref.connection}")
        folder = datacenters[0].get("vmFolder")
        wanted_folder = host.settings.get("folder")
        if wanted_folder:
            folder = self._folder(session, folder, wanted_folder, label)
        stores = [d for d in kinds.get("Datastore", []) if d.get("summary.accessible", True)]
        wanted_ds = host.settings.get("datastore")
        if wanted_ds:
            stores = [d for d in stores if d.get("name") == wanted_ds]
            if not stores:
                raise InvalidInput(
                    f"host {label} has no accessible datastore {wanted_ds!r} (host setting datastore)"
                )
        if not stores:
            raise DriverError(f"host {label} has no accessible datastore for the VM's files")
        datastore = max(stores, key=lambda d: int(d.get("summary.freeSpace") or 0))
        network_name = spec.network or host.network or self.vmware.network
        networks = [
            n
            for n in kinds.get("Network", []) + kinds.get("DistributedVirtualPortgroup", [])
            if n.get("name") == network_name
        ]
        if not networks:
            known = sorted(
                {
                    str(n.get("name"))
                    for n in kinds.get("Network", []) + kinds.get("DistributedVirtualPortgroup", [])
                }
            )
            raise InvalidInput(
                f"host {label} has no port group {network_name!r} (set it with 'qrm resource set {label} "
                f"--network PORTGROUP'; the host has: {', '.join(known) or 'none'})"
            )
        return {
            "pool": pool,
            "host": host_obj,
            "folder": folder,
            "datastore": datastore,
            "network": networks[0],
        }

    def _folder(self, session: vsphere.Session, root: Any, name: str, label: str) -> Any:
        found = session.retrieve_objects(
            [root],
            [(vim.Folder, ["name"])],
            [PC.TraversalSpec(name="children", type=vim.Folder, path="childEntity")],
            skip=True,
            what=f"the VM folders of {label}'s datacenter",
        )
        for obj in found:
            if obj.kind == "Folder" and obj.get("name") == name:
                return obj.ref
        raise InvalidInput(f"the datacenter of host {label} has no VM folder {name!r} (host setting folder)")

    def _nic_backing(self, session: vsphere.Session, network: vsphere.Obj) -> Any:
        if network.kind == "DistributedVirtualPortgroup":
            switch = network.get("config.distributedVirtualSwitch")
            found = session.retrieve_objects(
                [switch], [(vim.DistributedVirtualSwitch, ["uuid"])], what="the distributed switch"
            )
            if not found:
                raise DriverError(f"the distributed switch of port group {network.get('name')} is gone")
            return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(switchUuid=found[0].get("uuid"), portgroupKey=network.get("key"))
            )
        return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
            deviceName=network.get("name"), network=network.ref
        )

    def _create(
        self, session: vsphere.Session, host: HostTarget, ref: HostRef, spec: PartitionSpec
    ) -> PartitionInfo:
        place = self._pick(session, host, ref, spec)
        mac = (spec.mac or _random_mac()).lower()
        marker = Marker(
            partition=spec.name, mac=mac, creating=True, cluster=ref.moid if ref.is_cluster else None
        )
        nic_type = NIC_TYPES[host.settings.get("nic", "vmxnet3")]
        nic = nic_type(
            key=-100,
            addressType="manual",
            macAddress=mac,
            backing=self._nic_backing(session, place["network"]),
            connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                startConnected=True, connected=True, allowGuestControl=True
            ),
        )
        name = refs.vm_name(spec.name, mac)
        config = vim.vm.ConfigSpec(
            name=name,
            annotation=marker.text(),
            guestId=host.settings.get("guest_id", self.vmware.guest_id),
            numCPUs=spec.cpus,
            memoryMB=spec.memory_mb,
            memoryHotAddEnabled=True,
            cpuHotAddEnabled=True,
            files=vim.vm.FileInfo(vmPathName=f"[{place['datastore'].get('name')}]"),
            deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=nic)],
        )
        what = f"creating VM {name} on {host.label}"
        try:
            vm = self._task(
                session,
                what,
                lambda: place["folder"].CreateVM_Task(config=config, pool=place["pool"], host=place["host"]),
            )
        except QrmError:
            self._remove_half_made(session, host, ref, marker)
            raise
        try:
            info = self._finish(session, host, vm, marker)
        except QrmError as exc:
            left = self._destroy_vm(session, vm, name)
            raise DriverError(
                f"{exc.message}; the half-made VM {name} was "
                + ("removed again" if left is None else f"left in vCenter, marked 'state=creating' ({left})")
            ) from None
        self._known[(ref.connection, ref.moid, spec.name)] = str(vm._moId)
        return info

    def _finish(self, session: vsphere.Session, host: HostTarget, vm: Any, marker: Marker) -> PartitionInfo:
        """Check what vCenter made, point the first boot device at the NIC, clear ``state=creating``."""
        found = session.retrieve_objects(
            [vm], [(vim.VirtualMachine, ["name", "config.hardware.device", *VM_PATHS[1:]])], what="the new VM"
        )
        if not found:
            raise DriverError("vCenter lost the VM it just created")
        nics = [
            d
            for d in found[0].get("config.hardware.device") or ()
            if isinstance(d, vim.vm.device.VirtualEthernetCard)
        ]
        if len(nics) != 1 or (nics[0].macAddress or "").lower() != marker.mac:
            got = ", ".join((d.macAddress or "?") for d in nics) or "none"
            raise DriverError(f"vCenter gave the VM the NIC(s) {got}, not {marker.mac} as asked")
        done = replace(marker, creating=False)
        spec = vim.vm.ConfigSpec(
            annotation=done.text(),
            bootOptions=vim.vm.BootOptions(
                bootOrder=[vim.vm.BootOptions.BootableEthernetDevice(deviceKey=nics[0].key)],
                bootRetryEnabled=True,
                bootRetryDelay=10000,
            ),
        )
        name = str(found[0].get("name"))
        self._task(
            session, f"configuring the network boot of VM {name}", lambda: vm.ReconfigVM_Task(spec=spec)
        )
        obj = vsphere.Obj(vm, {**found[0].props, "config.annotation": done.text()})
        made = Vm.from_obj(obj)
        assert made is not None
        return made.info()

    def _destroy_vm(self, session: vsphere.Session, vm: Any, name: str) -> str | None:
        """Remove a VM qrm could not finish; the reason it stayed, or None."""
        try:
            self._task(session, f"removing the half-made VM {name}", vm.Destroy_Task)
        except NotFound:
            return None
        except QrmError as exc:
            return exc.message
        return None

    def _remove_half_made(
        self, session: vsphere.Session, host: HostTarget, ref: HostRef, marker: Marker
    ) -> None:
        """After a failed or unanswered CreateVM: a VM vCenter made anyway goes again."""
        try:
            vms = self._vms(session, ref, f"host {host.label}")
        except QrmError:
            return
        for vm in vms:
            if vm.marker.mac == marker.mac and vm.marker.creating:
                self._destroy_vm(session, vm.ref, vm.name)

    def destroy_partition(self, host: HostTarget, name: str) -> None:
        ref = self._ref(host)

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            if vm.power != "poweredOff":
                self._power(session, vm, "off")
            self._task(
                session, f"destroying VM {vm.name} (partition {name} on {host.label})", vm.ref.Destroy_Task
            )
            self._known.pop((ref.connection, ref.moid, name), None)

        self._run(ref, run)

    # -- power -----------------------------------------------------------------

    def _power(self, session: vsphere.Session, vm: Vm, to: str) -> None:
        """``on`` / ``off`` / ``suspend`` / ``reset``; already there is fine."""
        call = {
            "on": vm.ref.PowerOnVM_Task,
            "off": vm.ref.PowerOffVM_Task,
            "suspend": vm.ref.SuspendVM_Task,
            "reset": vm.ref.ResetVM_Task,
        }[to]
        verb = {"on": "powering on", "off": "powering off", "suspend": "suspending", "reset": "resetting"}[to]
        try:
            self._task(session, f"{verb} VM {vm.name}", call)
        except vsphere.TaskFailed as exc:
            target = {"on": "poweredOn", "off": "poweredOff", "suspend": "suspended"}.get(to)
            if (
                exc.fault == "InvalidPowerState"
                and target is not None
                and self._power_state(session, vm) == target
            ):
                return  # it was there already
            raise

    def _power_state(self, session: vsphere.Session, vm: Vm) -> str:
        found = session.retrieve_objects(
            [vm.ref], [(vim.VirtualMachine, ["runtime.powerState"])], what=f"VM {vm.name}"
        )
        return str(found[0].get("runtime.powerState")) if found else ""

    def start_partition(self, host: HostTarget, name: str) -> None:
        ref = self._ref(host)

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            if vm.power == "poweredOn":
                return
            if vm.marker.pending and vm.power == "poweredOff":
                self._apply_pending(session, vm)
            self._power(session, vm, "on")

        self._run(ref, run)

    def stop_partition(self, host: HostTarget, name: str, force: bool = False) -> None:
        ref = self._ref(host)

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            if vm.power == "poweredOff":
                return
            if not force and vm.power == "poweredOn" and self._shutdown_guest(session, vm):
                return
            self._power(session, vm, "off")

        self._run(ref, run)

    def _shutdown_guest(self, session: vsphere.Session, vm: Vm) -> bool:
        """Ask the guest to shut down (needs VMware Tools in it); True if it went off in time."""
        try:
            vm.ref.ShutdownGuest()
        except (vim.fault.ToolsUnavailable, vim.fault.InvalidState, vmodl.fault.NotSupported):
            return False
        except vmodl.MethodFault:
            return False
        deadline = time.monotonic() + self.vmware.shutdown_timeout
        while time.monotonic() < deadline:
            if self._power_state(session, vm) == "poweredOff":
                return True
            time.sleep(0.5)
        return False

    def reboot_partition(self, host: HostTarget, name: str) -> None:
        ref = self._ref(host)

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            if vm.power != "poweredOn":
                raise DriverError(
                    f"partition {name} on {host.label} is {vm.state}, not running: start it instead"
                )
            if vm.marker.pending:
                # A reset does not apply what waits for the next power-on: power off and on.
                self._power(session, vm, "off")
                self._apply_pending(session, vm)
                self._power(session, vm, "on")
            else:
                self._power(session, vm, "reset")

        self._run(ref, run)

    def pause_partition(self, host: HostTarget, name: str) -> None:
        ref = self._ref(host)

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            if vm.power != "poweredOn":
                raise DriverError(
                    f"partition {name} on {host.label} is {vm.state}: only a running partition can be paused"
                )
            self._power(session, vm, "suspend")

        self._run(ref, run)

    def unpause_partition(self, host: HostTarget, name: str) -> None:
        ref = self._ref(host)

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            if vm.power != "suspended":
                raise DriverError(f"partition {name} on {host.label} is {vm.state}, not paused")
            self._power(session, vm, "on")

        self._run(ref, run)

    # -- resources ---------------------------------------------------------------

    def _reconfigure(self, session: vsphere.Session, vm: Vm, spec: Any, what: str) -> None:
        self._task(session, f"{what} of VM {vm.name}", lambda: vm.ref.ReconfigVM_Task(spec=spec))

    def _apply_pending(self, session: vsphere.Session, vm: Vm) -> None:
        pending = vm.marker.pending
        spec = vim.vm.ConfigSpec(annotation=vm.marker.with_pending(memory_mb=None, cpus=None).text())
        if "memory_mb" in pending:
            spec.memoryMB = pending["memory_mb"]  # type: ignore[assignment]
        if "cpus" in pending:
            spec.numCPUs = pending["cpus"]
        self._reconfigure(session, vm, spec, "applying the changes waiting for the power-on")

    def _resize(
        self, host: HostTarget, name: str, what: str, value: int, *, live: bool, persistent: bool
    ) -> None:
        ref = self._ref(host)
        key = "memory_mb" if what == "memory" else "cpus"

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            current = vm.memory_mb if what == "memory" else vm.cpus
            spec = vim.vm.ConfigSpec()
            setattr(spec, "memoryMB" if what == "memory" else "numCPUs", value)
            if vm.power == "poweredOff":
                if not persistent:
                    raise DriverError(
                        f"partition {name} on {host.label} is stopped: a live-only change has nothing to change"
                    )
                if vm.marker.pending.get(key) is not None:
                    spec.annotation = vm.marker.with_pending(**{key: None}).text()
                self._reconfigure(session, vm, spec, f"setting the {what}")
                return
            if not persistent:
                raise DriverError(
                    "vSphere keeps every change in the VM's configuration: a live-only change is not possible"
                )
            if live:
                if what == "memory":
                    hot = vm.memory_hot_add and value >= current
                    why = (
                        "memory hot-add is off for it"
                        if not vm.memory_hot_add
                        else "vSphere cannot take memory from a running VM"
                    )
                else:
                    hot = (vm.cpu_hot_add and value >= current) or (vm.cpu_hot_remove and value <= current)
                    why = "CPU hot-add is off for it" if value >= current else "CPU hot-remove is off for it"
                if vm.power == "suspended":
                    hot, why = False, "it is paused (suspended)"
                if not hot:
                    raise DriverError(
                        f"cannot change the {what} of running partition {name} on {host.label} now: {why}; "
                        "ask for it at its next power-on instead (not live: qrm partition set ... --config)"
                    )
                self._reconfigure(session, vm, spec, f"hot-adding {what}")
                return
            # Not live: vSphere has no pending configuration, so qrm keeps it in
            # the VM's notes and applies it at the next power-on it makes.
            note = vim.vm.ConfigSpec(annotation=vm.marker.with_pending(**{key: value}).text())
            self._reconfigure(session, vm, note, f"noting the {what} for the next power-on")

        self._run(ref, run)

    def set_memory(
        self, host: HostTarget, name: str, memory_mb: int, *, live: bool = True, persistent: bool = True
    ) -> None:
        if memory_mb < 4 or memory_mb % 4:
            raise InvalidInput(f"vSphere needs VM memory in multiples of 4 MB (at least 4), not {memory_mb}")
        self._resize(host, name, "memory", memory_mb, live=live, persistent=persistent)

    def set_vcpus(
        self, host: HostTarget, name: str, cpus: int, *, live: bool = True, persistent: bool = True
    ) -> None:
        if not 1 <= cpus <= 768:
            raise InvalidInput(f"a vSphere VM has 1 to 768 virtual CPUs, not {cpus}")
        self._resize(host, name, "virtual CPUs", cpus, live=live, persistent=persistent)

    def pin_vcpus(
        self,
        host: HostTarget,
        name: str,
        pinning: dict[int, tuple[int, ...]],
        *,
        live: bool = True,
        persistent: bool = True,
    ) -> None:
        ref = self._ref(host)
        if ref.is_cluster:
            raise self.unsupported("pin_vcpus", host.label)
        sets = {tuple(sorted(cpus)) for cpus in pinning.values()}
        if len(sets) > 1:
            raise InvalidInput(
                "vSphere pins all of a VM's virtual CPUs to one set of host CPUs (CPU affinity): "
                "give every virtual CPU the same CPU list"
            )
        if not sets or not next(iter(sets)):
            raise InvalidInput("give at least one host CPU to pin to")
        cpus = next(iter(sets))
        if any(c < 0 or c >= host.cpus for c in cpus):
            raise InvalidInput(f"host {host.label} has CPUs 0-{host.cpus - 1}")

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            if any(v >= vm.cpus or v < 0 for v in pinning):
                raise InvalidInput(f"partition {name} has virtual CPUs 0-{vm.cpus - 1}")
            if len(cpus) < vm.cpus:
                raise InvalidInput(
                    f"vSphere needs at least as many host CPUs in the affinity set ({len(cpus)}) as the VM "
                    f"has virtual CPUs ({vm.cpus})"
                )
            spec = vim.vm.ConfigSpec(cpuAffinity=vim.vm.AffinityInfo(affinitySet=list(cpus)))
            self._reconfigure(session, vm, spec, "setting the CPU affinity")

        self._run(ref, run)

    # -- migration -----------------------------------------------------------------

    def migrate_partition(
        self, host: HostTarget, name: str, destination: HostTarget, live: bool = True
    ) -> None:
        ref = self._ref(host)
        dest = refs.parse_host_uri(destination.uri, f"host {destination.label}")
        if dest.connection != ref.connection:
            raise InvalidInput(
                f"{host.label} and {destination.label} are in different vCenters ({ref.connection}, "
                f"{dest.connection}): vMotion moves VMs within one vCenter"
            )
        if dest == ref:
            raise InvalidInput(f"partition {name} is on {host.label} already")

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            target = self._retrieve_from_host(
                session,
                dest,
                [
                    (vim.HostSystem, ["parent", "runtime.connectionState"]),
                    (vim.ClusterComputeResource, ["resourcePool"]),
                ],
                what=f"host {destination.label}",
            )
            if not target:
                raise NotFound(f"vCenter {dest.connection} no longer has host {destination.label}")
            if dest.is_cluster:
                pool, dest_host = target[0].get("resourcePool"), None
            else:
                if target[0].get("runtime.connectionState") != "connected":
                    raise DriverError(
                        f"host {destination.label} is {target[0].get('runtime.connectionState')} in vCenter"
                    )
                parent = target[0].get("parent")
                owner = session.retrieve_objects(
                    [parent],
                    [(vim.ComputeResource, ["resourcePool"])],
                    what=f"the cluster of {destination.label}",
                )
                pool, dest_host = (owner[0].get("resourcePool") if owner else None), target[0].ref
            running = vm.power == "poweredOn"
            if running and not live:
                self._power(session, vm, "off")
            what = f"{'vMotion' if running and live else 'migrating'} VM {vm.name} to {destination.label}"
            self._task(
                session,
                what,
                lambda: vm.ref.MigrateVM_Task(pool=pool, host=dest_host, priority="defaultPriority"),
            )
            self._known.pop((ref.connection, ref.moid, name), None)
            self._known[(dest.connection, dest.moid, name)] = str(vm.ref._moId)
            moved = replace(vm.marker, cluster=dest.moid if dest.is_cluster else None)
            if moved != vm.marker:
                # Now the partition of the cluster (vCenter places it), or of the one host.
                self._reconfigure(
                    session, vm, vim.vm.ConfigSpec(annotation=moved.text()), "recording the new owner"
                )
            if running and not live:
                self._power(session, vm, "on")

        self._run(ref, run)

    # -- snapshots -------------------------------------------------------------------

    def _snapshots(self, session: vsphere.Session, vm: Vm) -> list[Any]:
        found = session.retrieve_objects(
            [vm.ref], [(vim.VirtualMachine, ["snapshot"])], what=f"the snapshots of {vm.name}"
        )
        info = found[0].get("snapshot") if found else None
        flat: list[Any] = []

        def walk(trees: Any) -> None:
            for tree in trees or ():
                flat.append(tree)
                walk(tree.childSnapshotList)

        walk(info.rootSnapshotList if info is not None else ())
        return sorted(flat, key=lambda t: (t.createTime, t.id))

    @staticmethod
    def _check_label(label: str) -> None:
        if not label or len(label) > 64 or any(not (c.isalnum() or c in "._-") for c in label):
            raise InvalidInput(f"snapshot label {label!r} must be 1-64 letters, digits, '.', '_' or '-'")

    def snapshot_partition(self, host: HostTarget, name: str, label: str) -> None:
        self._check_label(label)
        ref = self._ref(host)

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            if any(t.name == label for t in self._snapshots(session, vm)):
                raise DriverError(f"partition {name} already has a snapshot {label!r}")
            self._task(
                session,
                f"taking snapshot {label} of VM {vm.name}",
                lambda: vm.ref.CreateSnapshot_Task(
                    name=label, description="taken by qrm", memory=False, quiesce=False
                ),
            )

        self._run(ref, run)

    def _snapshot(self, session: vsphere.Session, vm: Vm, name: str, label: str) -> Any:
        for tree in self._snapshots(session, vm):
            if tree.name == label:
                return tree.snapshot
        raise NotFound(f"partition {name} has no snapshot {label!r}")

    def revert_partition(self, host: HostTarget, name: str, label: str) -> None:
        ref = self._ref(host)

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            snapshot = self._snapshot(session, vm, name, label)
            self._task(session, f"reverting VM {vm.name} to snapshot {label}", snapshot.RevertToSnapshot_Task)

        self._run(ref, run)

    def remove_partition_snapshot(self, host: HostTarget, name: str, label: str) -> None:
        ref = self._ref(host)

        def run(session: vsphere.Session) -> None:
            vm = self._vm(session, host, name)
            snapshot = self._snapshot(session, vm, name, label)
            self._task(
                session,
                f"removing snapshot {label} of VM {vm.name}",
                lambda: snapshot.RemoveSnapshot_Task(removeChildren=False),
            )

        self._run(ref, run)

    def list_partition_snapshots(self, host: HostTarget, name: str) -> list[str]:
        ref = self._ref(host)
        return self._run(ref, lambda s: [t.name for t in self._snapshots(s, self._vm(s, host, name))])


def _random_mac() -> str:
    import secrets

    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
