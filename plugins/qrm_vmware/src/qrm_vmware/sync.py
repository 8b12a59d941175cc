"""``qrm vmware sync``: vCenter's hosts and clusters become qrm host resources; qrm's VMs are checked.

One sync is one PropertyCollector read of the whole inventory
(:mod:`qrm_vmware.inventory`), then one transaction through core's services:

* every ESXi host becomes (or stays) a host resource of hypervisor
  ``vmware`` with its CPUs (hardware threads), memory, free memory and load
  (busy CPUs); a cluster becomes one too, with the sums of its usable hosts
  (vCenter picks the host of each VM created on it);
* a host vCenter lost (disconnected, not responding) is in ``error``, one
  powered off or in maintenance is ``off``, one removed from vCenter is kept,
  ``off`` and marked as gone (core's rule: nothing vanishes silently);
* each partition of those hosts is compared with its VM (found by the MAC in
  the VM's notes): a power state qrm has not seen yet, a vMotion (the
  partition follows its VM to the other host resource), or a VM deleted in
  vCenter are reported to core.

No database transaction is open while vCenter answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from qrm_core.plugin_api import (
    EventLevel,
    ManagedHost,
    ManagedSyncReport,
    ObservedPartition,
    ServiceContext,
    observe_partitions,
    service_context,
    sync_managed_hosts,
)
from qrm_vmware import inventory, refs, vsphere
from qrm_vmware.connections import Connection, ConnectionStore
from qrm_vmware.inventory import Inventory
from qrm_vmware.settings import VmwareSettings
from qrm_vmware.settings import load as load_settings

log = logging.getLogger("qrm.plugins.vmware")

HYPERVISOR = "vmware"
STATES = {"poweredOn": "running", "poweredOff": "stopped", "suspended": "paused"}


def manager_name(connection: str) -> str:
    return f"vmware:{connection}"


@dataclass
class SyncResult:
    connection: str
    hosts: int = 0
    clusters: int = 0
    vms: int = 0
    partitions: int = 0
    report: ManagedSyncReport = field(default_factory=ManagedSyncReport)
    partition_changes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{self.hosts} hosts, {self.clusters} clusters, {self.vms} VMs ({self.partitions} of qrm): "
            + self.report.summary()
        )
        if self.partition_changes:
            text += f"; partitions: {'; '.join(self.partition_changes[:5])}"
            if len(self.partition_changes) > 5:
                text += f" (+{len(self.partition_changes) - 5} more)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "connection": self.connection,
            "hosts": self.hosts,
            "clusters": self.clusters,
            "vms": self.vms,
            "partitions": self.partitions,
            "added": self.report.added,
            "changed": self.report.changed,
            "removed": self.report.removed,
            "unchanged": self.report.unchanged,
            "problems": self.report.problems,
            "partition_changes": self.partition_changes,
        }


def managed_hosts(connection: Connection, inv: Inventory) -> list[ManagedHost]:
    """What core is told: every host and every cluster."""
    name = connection.name
    uuid = connection.instance_uuid or connection.url
    found: list[ManagedHost] = []
    for host in inv.hosts.values():
        cluster = inv.clusters.get(host.cluster) if host.cluster else None
        problem = host.problem()
        state = "idle" if not problem else ("error" if host.connection_state != "connected" else "off")
        found.append(
            ManagedHost(
                mac=refs.host_mac(uuid, host.moid),
                name=host.name,
                hypervisor=HYPERVISOR,
                cpus=host.cpus,
                memory_mb=host.memory_mb,
                uri=refs.host_uri(name, "HostSystem", host.moid),
                state=state,
                reason=f"{problem} (vCenter {name})" if problem else "",
                free_memory_mb=host.free_memory_mb,
                load=host.busy_cpus,
                comment=f"ESXi {host.version} host {host.name} of vCenter {name}"
                + (f", in cluster {cluster.name}" if cluster else ""),
            )
        )
    for cluster in inv.clusters.values():
        members = [inv.hosts[m] for m in cluster.hosts if m in inv.hosts]
        usable = [h for h in members if h.usable]
        found.append(
            ManagedHost(
                mac=refs.host_mac(uuid, cluster.moid),
                name=cluster.name,
                hypervisor=HYPERVISOR,
                cpus=sum(h.cpus for h in usable),
                memory_mb=sum(h.memory_mb for h in usable),
                uri=refs.host_uri(name, "ClusterComputeResource", cluster.moid),
                state="idle" if usable else "error",
                reason="" if usable else f"no usable host in cluster {cluster.name} (vCenter {name})",
                free_memory_mb=sum(h.free_memory_mb for h in usable),
                load=round(sum(h.busy_cpus for h in usable), 2),
                comment=f"cluster {cluster.name} of vCenter {name} ({len(members)} hosts; vCenter places each VM)",
            )
        )
    return found


def read_connection(core: Any, settings: VmwareSettings, name: str) -> Connection:
    return ConnectionStore(core, settings).read(core, name)


def sync_connection(
    core: Any,
    name: str,
    *,
    plugins: Any = None,
    actor: str | None = None,
    settings: VmwareSettings | None = None,
) -> SyncResult:
    """Sync one connection (see the module's documentation); raises a one-line QrmError when vCenter fails."""
    vmware = settings or load_settings()
    connection = read_connection(core, vmware, name)
    inv = vsphere.POOL.run(connection, vmware, inventory.read)
    result = SyncResult(connection=name, hosts=len(inv.hosts), clusters=len(inv.clusters), vms=inv.total_vms)
    result.partitions = len(inv.vms)
    with service_context(core, actor=actor or f"vmware-sync:{name}", plugins=plugins) as ctx:
        result.report = sync_managed_hosts(ctx, manager_name(name), managed_hosts(connection, inv))
        result.partition_changes = follow_partitions(ctx, name, inv)
        changed = (
            result.report.added or result.report.changed or result.report.removed or result.partition_changes
        )
        if changed or result.report.problems:
            ctx.record("vmware", name, f"sync of vCenter {name}: {result.summary()}")
        ConnectionStore(core, vmware).note_sync(ctx, name, "ok: " + result.summary())
        ctx.commit()
    return result


def note_failure(core: Any, name: str, message: str, *, plugins: Any = None) -> None:
    """Remember (and record, when it is news) that a sync of ``name`` failed."""
    vmware = load_settings()
    with service_context(core, actor=f"vmware-sync:{name}", plugins=plugins) as ctx:
        store = ConnectionStore(core, vmware)
        try:
            before = store.get(ctx, name, with_password=False).last_sync_result
        except Exception:  # noqa: BLE001 - removed meanwhile: nothing to note
            return
        if before != "failed: " + message:
            ctx.record("vmware", name, f"sync of vCenter {name} failed: {message}", level=EventLevel.ERROR)
        store.note_sync(ctx, name, "failed: " + message)
        ctx.commit()


def follow_partitions(ctx: ServiceContext, name: str, inv: Inventory) -> list[str]:
    """Tell core what vCenter says about the partitions on this connection's hosts."""
    return observe_partitions(ctx, manager_name(name), observed(name, inv.vms))


def observed(name: str, vms: list[inventory.Vm]) -> dict[str, ObservedPartition]:
    """qrm's VMs as core's partitions see them, by MAC: state, and the host resource they belong to."""
    seen: dict[str, ObservedPartition] = {}
    for vm in vms:
        if vm.marker.creating:
            continue
        owner = (
            refs.host_uri(name, "ClusterComputeResource", vm.marker.cluster)
            if vm.marker.cluster
            else refs.host_uri(name, "HostSystem", vm.host)
        )
        seen[vm.marker.mac] = ObservedPartition(state=STATES.get(vm.power, "stopped"), host_uri=owner)
    return seen
