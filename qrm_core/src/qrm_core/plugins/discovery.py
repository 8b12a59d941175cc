"""Discovery: which plugins and drivers are installed (entry points).

``qrm.plugins`` entry points name modules with ``@hookimpl`` functions;
``qrm.storage``, ``qrm.hypervisors`` and ``qrm.power`` entry points name driver
classes. Nothing here imports a plugin or a driver.
"""

from __future__ import annotations

import importlib.metadata as metadata
from dataclasses import dataclass, field
from typing import Any

from qrm_core.drivers.base import BaseDriver, HypervisorDriver, PowerDriver, StorageDriver
from qrm_core.errors import PluginError

PLUGIN_GROUP = "qrm.plugins"
STORAGE_GROUP = "qrm.storage"
HYPERVISOR_GROUP = "qrm.hypervisors"
POWER_GROUP = "qrm.power"
DRIVER_GROUPS: dict[str, type[BaseDriver]] = {
    STORAGE_GROUP: StorageDriver,
    HYPERVISOR_GROUP: HypervisorDriver,
    POWER_GROUP: PowerDriver,
}
KIND_BY_GROUP = {
    PLUGIN_GROUP: "plugin",
    STORAGE_GROUP: "storage",
    HYPERVISOR_GROUP: "hypervisor",
    POWER_GROUP: "power",
}
CORE_DISTRIBUTION = "qrm-core"


@dataclass
class EntryPointRecord:
    """One installed plugin or driver."""

    name: str
    group: str
    value: str
    distribution: str | None
    version: str | None
    enabled: bool = True
    loaded: bool = False
    error: str | None = None
    missing: list[str] = field(default_factory=list)
    description: str = ""
    disabled_by: str | None = None  # the plugin whose disabling disabled this driver

    @property
    def kind(self) -> str:
        return KIND_BY_GROUP.get(self.group, self.group)

    @property
    def status(self) -> str:
        if not self.enabled:
            return "disabled"
        if self.error:
            return "broken"
        if self.missing:
            return "missing dependencies"
        return "enabled"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "distribution": self.distribution,
            "version": self.version,
            "enabled": self.enabled,
            "loaded": self.loaded,
            "status": self.status,
            "error": self.error,
            "missing": list(self.missing),
            "description": self.description,
            "entry_point": self.value,
            "disabled_by": self.disabled_by,
        }


def installed_entry_points(group: str) -> list[EntryPointRecord]:
    """Every entry point of ``group`` in the environment, deduplicated, by name."""
    seen: dict[str, EntryPointRecord] = {}
    for ep in metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        record = EntryPointRecord(
            name=ep.name,
            group=group,
            value=ep.value,
            distribution=dist_name,
            version=dist.version if dist is not None else None,
        )
        previous = seen.get(ep.name)
        if previous is not None and previous.value != ep.value:
            record.error = (
                f"name clash: {previous.value} ({previous.distribution}) and {ep.value} ({dist_name})"
            )
        seen[ep.name] = record
    return sorted(seen.values(), key=lambda r: r.name)


def entry_point(group: str, name: str) -> metadata.EntryPoint:
    for ep in metadata.entry_points(group=group):
        if ep.name == name:
            return ep
    raise PluginError(f"plugin {name!r} is not installed")
