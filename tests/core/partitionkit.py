"""A site for partition tests: hypervisor hosts registered through the agent
protocol, partitions that boot and register as their VMs would, and a VE one
of them can serve. Used by the CLI, API and state-machine tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrm_core.config import Settings
from qrm_core.drivers.base import HostTarget, HypervisorDriver
from qrm_core.drivers.fake import FakeHypervisor
from qrm_core.engine.reconciler import Reconciler
from qrm_core.plugins import PluginSystem
from qrm_core.services import agent, boot_images, service_context, storage
from qrm_core.services import virtual_environments as ves

#: hostname -> (MAC, CPUs, MB, hypervisors its agent reports)
HOSTS = {
    "hv1": ("52:54:00:10:00:01", 4, 4096, ["fake"]),
    "hv2": ("52:54:00:10:00:02", 8, 8192, ["fake"]),
    "bare": ("52:54:00:10:00:03", 2, 2048, []),
    "hv9": ("52:54:00:10:00:09", 4, 4096, ["partial"]),
}


class PartialHypervisor(FakeHypervisor):
    """The fake hypervisor without pinning, migration or reboots: a real driver
    class that supports only some optional operations (by not having them)."""

    name = "partial"
    description = "the fake hypervisor without pinning, migration or reboots"

    pin_vcpus = HypervisorDriver.pin_vcpus
    migrate_partition = HypervisorDriver.migrate_partition
    reboot_partition = HypervisorDriver.reboot_partition


@dataclass
class Tokens:
    """The agent tokens of registered machines, by MAC (to heartbeat as them)."""

    by_mac: dict[str, tuple[int, str]]


def register(settings: Settings, plugins: PluginSystem, mac: str, **kwargs: Any) -> tuple[int, str]:
    with service_context(settings, actor="agent", plugins=plugins) as ctx:
        reg = agent.register(ctx, mac=mac, ip=kwargs.pop("ip", None), **kwargs)
    return reg.resource_id, reg.token


def add_hosts(settings: Settings, plugins: PluginSystem, *names: str) -> dict[str, int]:
    """Register the named hosts (default: all of :data:`HOSTS`) as their agents would."""
    ids = {}
    for n, name in enumerate(names or HOSTS, start=1):
        mac, cpus, memory, hypervisors = HOSTS[name]
        ids[name], _ = register(
            settings,
            plugins,
            mac,
            ip=f"198.18.0.{n}",
            cpus=cpus,
            memory_mb=memory,
            hostname=name,
            hypervisors=hypervisors,
        )
    return ids


def boot_partitions(
    settings: Settings, plugins: PluginSystem, partitions: list[Any]
) -> dict[str, tuple[int, str]]:
    """The partitions' VMs boot from the network and register (idle virtual resources)."""
    booted = {}
    for n, p in enumerate(partitions, start=1):
        booted[p.name] = register(
            settings, plugins, p.mac, ip=f"198.18.1.{n}", cpus=p.cpus, memory_mb=p.memory_mb
        )
    return booted


def add_ve(settings: Settings, plugins: PluginSystem, name: str = "web", *, failover: bool = False) -> None:
    """A stopped VE that runs on a virtual resource of the fake hypervisor."""
    with service_context(settings, actor="tester", plugins=plugins) as ctx:
        storage.add_storage(ctx, name="st", type="fake", address="10.0.0.2")
        storage.add_filesystem_image(ctx, name="root", storage="st", location="/r")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")
        ves.create_ve(
            ctx,
            name=name,
            boot_image="idle",
            fs_image="root",
            kind="virtual",
            hypervisor="fake",
            failover=failover,
        )


def start_ve(settings: Settings, plugins: PluginSystem, name: str = "web") -> None:
    """Start the VE and let the engine place it (one pass)."""
    with service_context(settings, actor="tester", plugins=plugins) as ctx:
        ves.start_ve(ctx, name)
    Reconciler(settings, plugins).tick()


def fake_state(settings: Settings, host_mac: str) -> Any:
    """What the fake hypervisor keeps for a host (its partitions), as plain data."""
    path = settings.state_dir / "fake-hypervisor" / f"host-{host_mac.replace(':', '')}.json"
    return json.loads(Path(path).read_text()) if path.exists() else {}


def host(name: str) -> HostTarget:
    mac, cpus, memory, _ = HOSTS[name]
    return HostTarget(resource_id=0, mac=mac, address=None, hostname=name, cpus=cpus, memory_mb=memory)
