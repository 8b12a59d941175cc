"""vCenter's inventory as qrm needs it: hosts, clusters and VMs in one PropertyCollector call.

:func:`read` asks for every host, cluster and VM under the root folder with
one ContainerView and one ``RetrievePropertiesEx`` (plus one
``ContinueRetrievePropertiesEx`` per further page of
``QRM_VMWARE_PAGE_SIZE`` objects): the number of round trips does not grow
with the number of VMs. Reading the same properties attribute by attribute
costs one round trip per property per object (see bench/vmware).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyVmomi import vim

from qrm_vmware import refs
from qrm_vmware.refs import Marker
from qrm_vmware.vsphere import Obj, Session

HOST_PATHS = (
    "name",
    "parent",
    "runtime.connectionState",
    "runtime.inMaintenanceMode",
    "runtime.powerState",
    "summary.hardware.numCpuThreads",
    "summary.hardware.cpuMhz",
    "summary.hardware.memorySize",
    "summary.quickStats.overallCpuUsage",
    "summary.quickStats.overallMemoryUsage",
    "summary.config.product.version",
)
CLUSTER_PATHS = ("name", "host")
#: What the sync needs of every VM: whether it is qrm's (its notes), and where and how it runs.
#: (Sizes are the driver's business: ``qrm partition sync HOST`` compares them.) Each property
#: read for 1,000 VMs is 1,000 more elements to parse, so nothing else is read.
VM_PATHS = (
    "runtime.powerState",
    "runtime.host",
    "config.annotation",
)
KINDS = (
    (vim.HostSystem, HOST_PATHS),
    (vim.ClusterComputeResource, CLUSTER_PATHS),
    (vim.VirtualMachine, VM_PATHS),
)


@dataclass(frozen=True)
class Host:
    moid: str
    name: str
    cluster: str | None  # the cluster's moid, None for a standalone host
    connection_state: str  # connected, disconnected, notResponding
    maintenance: bool
    power: str  # poweredOn, poweredOff, standBy, unknown
    cpus: int
    cpu_mhz: int
    memory_mb: int
    cpu_usage_mhz: int
    memory_usage_mb: int
    version: str

    @property
    def usable(self) -> bool:
        return self.connection_state == "connected" and not self.maintenance and self.power == "poweredOn"

    @property
    def free_memory_mb(self) -> int:
        return max(self.memory_mb - self.memory_usage_mb, 0)

    @property
    def busy_cpus(self) -> float:
        """CPU use as a number of busy CPUs (what qrm shows as a resource's load)."""
        if not self.cpu_mhz:
            return 0.0
        return round(self.cpu_usage_mhz / self.cpu_mhz, 2)

    def problem(self) -> str:
        if self.connection_state != "connected":
            return f"vCenter reports the host {self.connection_state}"
        if self.power != "poweredOn":
            return f"the host is {self.power}"
        if self.maintenance:
            return "the host is in maintenance mode"
        return ""


@dataclass(frozen=True)
class Cluster:
    moid: str
    name: str
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Vm:
    """A VM of qrm (one with qrm's marker in its notes)."""

    moid: str
    power: str
    host: str  # the host's moid
    marker: Marker


@dataclass(frozen=True)
class Inventory:
    hosts: dict[str, Host]
    clusters: dict[str, Cluster]
    vms: list[Vm]  # qrm's VMs only
    total_vms: int  # every VM vCenter has

    def vms_by_mac(self) -> dict[str, Vm]:
        return {vm.marker.mac: vm for vm in self.vms}


def _moid(value: object) -> str:
    return str(getattr(value, "_moId", "") or "")


def _host(obj: Obj) -> Host:
    parent = obj.get("parent")
    return Host(
        moid=obj.moid,
        name=str(obj.get("name") or obj.moid),
        cluster=_moid(parent)
        if parent is not None and parent._wsdlName == "ClusterComputeResource"
        else None,
        connection_state=str(obj.get("runtime.connectionState") or "notResponding"),
        maintenance=bool(obj.get("runtime.inMaintenanceMode")),
        power=str(obj.get("runtime.powerState") or "unknown"),
        cpus=int(obj.get("summary.hardware.numCpuThreads") or 0),
        cpu_mhz=int(obj.get("summary.hardware.cpuMhz") or 0),
        memory_mb=int(obj.get("summary.hardware.memorySize") or 0) // (1024 * 1024),
        cpu_usage_mhz=int(obj.get("summary.quickStats.overallCpuUsage") or 0),
        memory_usage_mb=int(obj.get("summary.quickStats.overallMemoryUsage") or 0),
        version=str(obj.get("summary.config.product.version") or ""),
    )


def build(objects: list[Obj]) -> Inventory:
    hosts: dict[str, Host] = {}
    clusters: dict[str, Cluster] = {}
    vms: list[Vm] = []
    total = 0
    parse = refs.parse_marker
    for obj in objects:
        kind = obj.kind
        if kind == "VirtualMachine":
            total += 1
            marker = parse(obj.props.get("config.annotation"))
            if marker is None:
                continue
            props = obj.props
            vms.append(
                Vm(
                    moid=obj.moid,
                    power=str(props.get("runtime.powerState") or "poweredOff"),
                    host=_moid(props.get("runtime.host")),
                    marker=marker,
                )
            )
        elif kind == "HostSystem":
            hosts[obj.moid] = _host(obj)
        elif kind == "ClusterComputeResource":
            clusters[obj.moid] = Cluster(
                moid=obj.moid,
                name=str(obj.get("name") or obj.moid),
                hosts=tuple(_moid(h) for h in obj.get("host") or ()),
            )
    return Inventory(hosts=hosts, clusters=clusters, vms=vms, total_vms=total)


def read(session: Session) -> Inventory:
    """Every host, cluster and VM: one ContainerView, one RetrievePropertiesEx (paged)."""
    return build(session.retrieve_view(KINDS, what="inventory"))
