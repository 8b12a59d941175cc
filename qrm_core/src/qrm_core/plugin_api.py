"""The public API for plugins: everything a plugin may use of qrm's core.

A plugin imports from this module and from nothing else of ``qrm_core``
(``from qrm_core.plugin_api import hookimpl, StorageDriver, service_context``);
the lint session fails otherwise (``scripts/check_plugin_imports.py``).
docs/plugins.md ("The plugin API") lists every name with what it is for, and
a test keeps that list and ``__all__`` in step.

Importing this module is cheap: the hook markers, errors, hook value types and
driver interfaces are imported at once; the services, models, settings and
CLI helpers (which bring in the database layer) only when first used. A
plugin's hook module should import those inside the functions that need them,
so ``qrm --help`` stays fast however many plugins are installed.

Everything here is stable within a minor version of qrm-core; a plugin pins
``qrm-core==<version>``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qrm_core import __version__
from qrm_core.context import (
    CONSOLE_OBJECT_TYPES,
    BackgroundService,
    ConsoleLink,
    ConsolePanel,
    HealthCheck,
    HookContext,
)
from qrm_core.drivers.base import (
    PARTITION_STATES,
    POWER_STATES,
    BaseDriver,
    CapacityInfo,
    ExportClient,
    ExportOutcome,
    ExportRequest,
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
    format_pinning,
    parse_pinning,
)
from qrm_core.errors import (
    AlreadyExists,
    AuthError,
    Conflict,
    DatabaseUnavailable,
    DriverError,
    Forbidden,
    IllegalTransition,
    InUse,
    InvalidInput,
    NotFound,
    PluginError,
    QrmError,
    UnsupportedOperation,
)
from qrm_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from qrm_core.cli.output import Output, message, print_json, show_list, show_one
    from qrm_core.config import PluginSettings, Settings, config_file, get_settings
    from qrm_core.models import (
        BootImagePublic,
        Deployment,
        EventLevel,
        EventPublic,
        FilesystemImagePublic,
        ImageOrigin,
        ImageState,
        PartitionPublic,
        PartitionState,
        PartitionSyncPublic,
        ResourceKind,
        ResourcePublic,
        ResourceState,
        StorageServerPublic,
        VEState,
        VirtualEnvironmentPublic,
    )
    from qrm_core.plugins import PluginSystem
    from qrm_core.remote import Runner, RunResult, cow_probe, is_remote_storage, shell_quote, storage_runner
    from qrm_core.services import ServiceContext, read_context, service_context, validation
    from qrm_core.services.boot import BootConfig, boot_config, boot_image_files
    from qrm_core.services.boot_images import list_boot_images
    from qrm_core.services.listening import check_listen, listen_address
    from qrm_core.services.managed import (
        ManagedHost,
        ManagedSyncReport,
        ObservedPartition,
        list_managed,
        observe_partitions,
        sync_managed_hosts,
    )
    from qrm_core.services.monitoring import MonitoredResource, MonitoredVE, monitoring_view
    from qrm_core.services.partitions import (
        hypervisor_hosts,
        list_partitions,
        observe_partition_state,
        sync_host,
    )
    from qrm_core.services.plugin_data import (
        delete_record,
        get_record,
        list_records,
        put_record,
        read_record,
    )
    from qrm_core.services.resources import (
        ResourceAddress,
        address_owner,
        list_resources,
        mark_failed,
        resource_addresses,
        show_resource,
    )
    from qrm_core.services.site import get_enrollment_token
    from qrm_core.services.storage import (
        add_filesystem_image,
        initiator_name,
        list_filesystem_images,
        list_storage,
        show_filesystem_image,
        show_storage,
    )
    from qrm_core.services.virtual_environments import list_ves, show_ve

#: name -> the module it comes from, imported on first use.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("Output", "message", "print_json", "show_list", "show_one"), "qrm_core.cli.output"),
    **dict.fromkeys(("PluginSettings", "Settings", "config_file", "get_settings"), "qrm_core.config"),
    **dict.fromkeys(
        (
            "BootImagePublic",
            "Deployment",
            "EventLevel",
            "EventPublic",
            "FilesystemImagePublic",
            "ImageOrigin",
            "ImageState",
            "PartitionPublic",
            "PartitionState",
            "PartitionSyncPublic",
            "ResourceKind",
            "ResourcePublic",
            "ResourceState",
            "StorageServerPublic",
            "VEState",
            "VirtualEnvironmentPublic",
        ),
        "qrm_core.models",
    ),
    "PluginSystem": "qrm_core.plugins",
    **dict.fromkeys(
        ("RunResult", "Runner", "cow_probe", "is_remote_storage", "shell_quote", "storage_runner"),
        "qrm_core.remote",
    ),
    **dict.fromkeys(("ServiceContext", "read_context", "service_context", "validation"), "qrm_core.services"),
    **dict.fromkeys(("BootConfig", "boot_config", "boot_image_files"), "qrm_core.services.boot"),
    "list_boot_images": "qrm_core.services.boot_images",
    **dict.fromkeys(("check_listen", "listen_address"), "qrm_core.services.listening"),
    **dict.fromkeys(
        ("hypervisor_hosts", "list_partitions", "observe_partition_state", "sync_host"),
        "qrm_core.services.partitions",
    ),
    **dict.fromkeys(
        (
            "ManagedHost",
            "ManagedSyncReport",
            "ObservedPartition",
            "list_managed",
            "observe_partitions",
            "sync_managed_hosts",
        ),
        "qrm_core.services.managed",
    ),
    **dict.fromkeys(
        ("delete_record", "get_record", "list_records", "put_record", "read_record"),
        "qrm_core.services.plugin_data",
    ),
    **dict.fromkeys(
        (
            "ResourceAddress",
            "address_owner",
            "list_resources",
            "mark_failed",
            "resource_addresses",
            "show_resource",
        ),
        "qrm_core.services.resources",
    ),
    **dict.fromkeys(("list_ves", "show_ve"), "qrm_core.services.virtual_environments"),
    **dict.fromkeys(("MonitoredResource", "MonitoredVE", "monitoring_view"), "qrm_core.services.monitoring"),
    "get_enrollment_token": "qrm_core.services.site",
    **dict.fromkeys(
        (
            "add_filesystem_image",
            "initiator_name",
            "list_filesystem_images",
            "list_storage",
            "show_filesystem_image",
            "show_storage",
        ),
        "qrm_core.services.storage",
    ),
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'qrm_core.plugin_api' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = (
        getattr(module, name) if name != "validation" else importlib.import_module(f"{module_name}.{name}")
    )
    globals()[name] = value
    return value


__all__ = [
    "CONSOLE_OBJECT_TYPES",
    "PARTITION_STATES",
    "POWER_STATES",
    "AlreadyExists",
    "AuthError",
    "BackgroundService",
    "BaseDriver",
    "BootConfig",
    "BootImagePublic",
    "CapacityInfo",
    "Conflict",
    "ConsoleLink",
    "ConsolePanel",
    "DatabaseUnavailable",
    "Deployment",
    "DriverError",
    "EventLevel",
    "EventPublic",
    "ExportClient",
    "ExportOutcome",
    "ExportRequest",
    "FilesystemImagePublic",
    "Forbidden",
    "HealthCheck",
    "HookContext",
    "HostInfo",
    "HostTarget",
    "HypervisorDriver",
    "IllegalTransition",
    "ImageOrigin",
    "ImageState",
    "InUse",
    "InvalidInput",
    "ManagedHost",
    "ManagedSyncReport",
    "MonitoredResource",
    "MonitoredVE",
    "NotFound",
    "ObservedPartition",
    "Output",
    "PartitionInfo",
    "PartitionPublic",
    "PartitionSpec",
    "PartitionState",
    "PartitionSyncPublic",
    "PluginError",
    "PluginSettings",
    "PluginSystem",
    "PowerDriver",
    "PowerTarget",
    "QrmError",
    "ResourceAddress",
    "ResourceKind",
    "ResourcePublic",
    "ResourceState",
    "RootSpec",
    "RunResult",
    "Runner",
    "ServiceContext",
    "Settings",
    "StorageDriver",
    "StorageServerPublic",
    "StorageTarget",
    "UnsupportedOperation",
    "VEState",
    "VirtualEnvironmentPublic",
    "VolumeInfo",
    "__version__",
    "add_filesystem_image",
    "address_owner",
    "boot_config",
    "boot_image_files",
    "check_listen",
    "config_file",
    "cow_probe",
    "delete_record",
    "format_pinning",
    "get_enrollment_token",
    "get_record",
    "get_settings",
    "hookimpl",
    "hypervisor_hosts",
    "initiator_name",
    "is_remote_storage",
    "list_boot_images",
    "list_filesystem_images",
    "list_managed",
    "list_partitions",
    "list_records",
    "list_resources",
    "list_storage",
    "list_ves",
    "listen_address",
    "mark_failed",
    "message",
    "monitoring_view",
    "observe_partition_state",
    "observe_partitions",
    "parse_pinning",
    "print_json",
    "put_record",
    "read_context",
    "read_record",
    "resource_addresses",
    "service_context",
    "shell_quote",
    "show_filesystem_image",
    "show_list",
    "show_one",
    "show_resource",
    "show_storage",
    "show_ve",
    "storage_runner",
    "sync_host",
    "sync_managed_hosts",
    "validation",
]
