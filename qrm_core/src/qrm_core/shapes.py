"""The public shapes: what the CLI and the API show (stable JSON).

Plain pydantic models, apart from the tables in :mod:`qrm_core.models` (which
re-exports them): the CLI working through a server (``qrm --server URL``)
parses the API's answers into them without importing SQLAlchemy, the ORM or
the services. Like SQLModel's models they validate from attributes (a table
row) as well as from dicts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField

#: The largest id or counter qrm accepts: it fits every database's integer column.
MAX_ID = 2**31 - 1


class PublicModel(BaseModel):
    """The base of every public shape: ``from_attributes`` and ``model_validate(..., update=)``
    as SQLModel's models have them."""

    model_config = ConfigDict(from_attributes=True)

    @classmethod
    def model_validate(
        cls,
        obj: Any,
        *,
        strict: bool | None = None,
        from_attributes: bool | None = None,
        context: Any | None = None,
        update: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Self:
        """``update``: values that replace (or add to) those of ``obj``."""
        if update:
            obj = {**obj, **update} if isinstance(obj, dict) else _Updated(obj, update)
        return super().model_validate(
            obj, strict=strict, from_attributes=from_attributes, context=context, **kwargs
        )


class _Updated:
    """An object whose attributes ``update`` replaces."""

    def __init__(self, obj: Any, update: dict[str, Any]) -> None:
        self._obj = obj
        self._update = update

    def __getattr__(self, name: str) -> Any:
        if name in self._update:
            return self._update[name]
        return getattr(self._obj, name)


class StorageServerPublic(PublicModel):
    id: int
    name: str
    type: str
    address: str
    comment: str
    created_at: datetime
    filesystem_images: list[str] = []
    #: Per-server driver settings (not secret: SSH keys live in files, never here).
    settings: dict[str, str] = {}
    #: Where qrm manages it from: ``this machine``, or ``USER@ADDRESS[:PORT]`` over SSH.
    managed_from: str = "this machine"
    #: Given when it is added: why machines cannot boot from it yet (left out when they can).
    warning: str = PydanticField(default="", exclude_if=lambda value: not value)


class FilesystemImagePublic(PublicModel):
    id: int
    name: str
    storage: str
    storage_type: str
    location: str
    origin: str
    state: str
    size_mb: int | None
    comment: str
    created_at: datetime
    source: str = ""
    source_at: datetime | None = None
    progress: str = ""
    used_by: list[str] = []


class ImageSnapshotPublic(PublicModel):
    """A snapshot of a filesystem image; ``how`` says how it was taken or reverted
    (``copy-on-write``, ``full copy``) where the operation just did it."""

    image: str
    label: str
    how: str = ""


class BootImagePublic(PublicModel):
    id: int
    name: str
    kernel_version: str
    kernel_path: str | None
    initrd_path: str | None
    kernel_sha256: str | None
    initrd_sha256: str | None
    cmdline: str
    is_default: bool
    comment: str
    created_at: datetime
    used_by: list[str] = []


class VirtualEnvironmentPublic(PublicModel):
    id: int
    name: str
    boot_image: str
    filesystem_image: str
    deployment: str
    req_kind: str | None
    req_hypervisor: str | None
    req_cpus: int
    req_memory_mb: int
    pool_size: int
    failover: bool
    monitor: list[str] = []
    monitor_failover: bool = False
    pristine: bool = False
    kernel_args: str
    desired_state: str
    state: str
    problem: str
    comment: str
    resources: list[str] = []
    created_at: datetime
    updated_at: datetime


class ResourcePublic(PublicModel):
    id: int
    mac: str
    ip: str | None
    hostname: str | None
    kind: str
    host: str | None
    hypervisor: str | None
    capabilities: list[str]
    cpus: int
    memory_mb: int
    state: str
    ve: str | None
    boot_generation: int
    heartbeat_timeout: float | None = None
    load: float | None
    last_seen: datetime | None
    state_changed_at: datetime
    comment: str
    managed_by: str | None = None
    free_memory_mb: int | None = None
    created_at: datetime


class HealthPublic(PublicModel):
    """What one monitoring plugin says about a resource."""

    source: str
    status: str
    message: str


class MemberHealthPublic(HealthPublic):
    """What one monitoring plugin says about one member of a virtual environment."""

    resource: str


class VirtualEnvironmentDetail(VirtualEnvironmentPublic):
    """One VE as ``ve show`` shows it: with what monitoring says about its members."""

    health: list[MemberHealthPublic] = []


class ResourceListPublic(PublicModel):
    """One page of resources."""

    items: list[ResourcePublic]
    total: int
    offset: int
    limit: int | None


class PartitionPublic(PublicModel):
    id: int
    name: str
    host: str
    hypervisor: str
    cpus: int
    memory_mb: int
    cpu_pinning: str
    mac: str
    state: str
    resource_id: int | None
    ve: str | None
    created_at: datetime


class HostCapacity(PublicModel):
    """What a hypervisor host can hold, what its partitions take, and what is free.

    Capacity is the host's CPUs and memory times the site's overcommit ratios
    (``QRM_CPU_OVERCOMMIT``, ``QRM_MEMORY_OVERCOMMIT``); every partition qrm
    has on the host counts, whatever its state.
    """

    hypervisors: list[str]
    cpus: int
    memory_mb: int
    cpu_overcommit: float
    memory_overcommit: float
    cpus_total: int
    memory_total_mb: int
    partitions: int
    cpus_used: int
    memory_used_mb: int
    cpus_free: int
    memory_free_mb: int


class ResourceDetail(ResourcePublic):
    """One resource as ``resource show`` shows it: with what monitoring says,
    how qrm reaches its hypervisor and power controller (never the
    controller's password), and for a hypervisor host its partitions and
    capacity."""

    health: list[HealthPublic] = []
    hypervisor_uri: str | None = None
    network: str | None = None
    host_settings: dict[str, str] = {}
    power_driver: str | None = None
    power_address: str | None = None
    power_username: str | None = None
    power_password_set: bool = False
    partitions: list[PartitionPublic] = []
    capacity: HostCapacity | None = None


class PowerStatePublic(PublicModel):
    """What a resource's power controller says (``qrm resource power status``), or did."""

    resource: str
    driver: str
    action: str
    state: str


class PartitionDetail(PartitionPublic):
    """One partition as ``partition show`` shows it: the resource it became,
    the virtual environment that resource serves, and the optional operations
    its host's driver supports (``pause_partition``, ``pin_vcpus``, ...)."""

    resource: str | None = None
    resource_state: str | None = None
    serves: str | None = None
    operations: list[str] = []


class PartitionSyncPublic(PublicModel):
    """What reconciling qrm's records of a host's partitions with its hypervisor changed."""

    host: str
    changes: list[str] = []
    unknown: list[str] = []


class EventPublic(PublicModel):
    id: int
    time: datetime
    actor: str
    object_type: str
    object_name: str
    level: str
    message: str


class UserPublic(PublicModel):
    id: int
    name: str
    role: str
    created_at: datetime


class ApiTokenPublic(PublicModel):
    """An API token as listed: never its secret nor the secret's hash."""

    id: int
    name: str
    user: str
    created_at: datetime
    last_used: datetime | None


class ApiTokenCreated(ApiTokenPublic):
    """A token just created: the only time its secret is shown."""

    token: str


class PluginPublic(PublicModel):
    """An installed plugin or driver as ``qrm plugins list`` shows it."""

    name: str
    kind: str
    distribution: str | None
    version: str | None
    enabled: bool
    loaded: bool
    status: str
    error: str | None
    missing: list[str]
    description: str
    entry_point: str
    disabled_by: str | None = None


class InitPublic(PublicModel):
    """What ``qrm init`` did."""

    database: str
    revision_before: str | None
    revision: str
    admin: str
    admin_created: bool
    default_password: bool
    boot_image: str = ""
