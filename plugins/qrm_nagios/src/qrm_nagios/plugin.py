"""Monitors every resource, VE and storage server with a real Nagios 4, and feeds its state back.

This module is the plugin's ``qrm.plugins`` entry point and is imported by
every qrm process, so it imports only the settings; the rest is imported when
a hook has work to do.

Event hooks never raise: a Nagios that cannot be updated must not undo or
hide the change of qrm that caused it. Inside ``qrm server`` a hook hands its
change to the plugin's worker (:mod:`qrm_nagios.service`) and returns at
once; in any other process (a ``qrm`` command on the database) it applies the
change itself. A failure is logged and recorded as an event; ``qrm nagios
sync`` brings Nagios back in step from the database at any time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qrm_core.plugin_api import ConsoleLink, ConsolePanel, HealthCheck, QrmError, hookimpl
from qrm_nagios.settings import NagiosSettings, load_settings

if TYPE_CHECKING:
    import typer

    from qrm_core.plugin_api import (
        BackgroundService,
        HookContext,
        PartitionPublic,
        ResourcePublic,
        StorageServerPublic,
        VirtualEnvironmentPublic,
    )
    from qrm_nagios.sync import Changes

PLUGIN = "nagios"
#: Resource fields that change its Nagios host.
HOST_FIELDS = frozenset({"ip", "hostname", "host", "kind", "mac"})


def _settings(ctx: HookContext) -> NagiosSettings | None:
    """The plugin settings, or None (not configured, or invalid: then logged and recorded)."""
    try:
        settings = load_settings()
    except QrmError as exc:
        _record_failure(ctx, f"Nagios settings are invalid, nothing changed: {exc.message}")
        return None
    return settings if settings.configured else None


def _record_failure(ctx: HookContext, message: str) -> None:
    ctx.log.error("nagios: %s", message)
    try:
        from qrm_core.plugin_api import EventLevel
        from qrm_nagios import watch

        watch.record(ctx.settings, [watch.Note(EventLevel.ERROR, "plugin", PLUGIN, f"nagios: {message}")])
    except Exception:
        ctx.log.exception("nagios: could not record the failure in the event log")


def _dispatch(ctx: HookContext, changes: Changes) -> None:
    settings = _settings(ctx)
    if settings is None:
        return
    try:
        from qrm_nagios import sync, watch
        from qrm_nagios.service import active_service

        service = active_service(settings, ctx.settings)
        if service is not None:
            service.submit(changes)
            return
        texts, report = sync.apply_changes_with_texts(settings, ctx.settings, changes)
        watch.record(ctx.settings, sync.notes_for(settings, report, texts))
    except Exception as exc:  # noqa: BLE001 - an event hook must not raise (see module text)
        text = exc.message if isinstance(exc, QrmError) else f"{type(exc).__name__}: {exc}"
        _record_failure(ctx, f"could not update Nagios: {text}")


def _changes(**kwargs: Any) -> Changes:
    from qrm_nagios.sync import Changes

    return Changes(**kwargs)


# -- resources ----------------------------------------------------------------


@hookimpl
def qrm_resource_added(resource: ResourcePublic, ctx: HookContext) -> None:
    """A host for the new resource, if it has an address."""
    _dispatch(ctx, _changes(resources={resource.id}))


@hookimpl
def qrm_resource_updated(resource: ResourcePublic, changed: list[str], ctx: HookContext) -> None:
    """Follow a change of address, name or hypervisor host."""
    if HOST_FIELDS.intersection(changed):
        _dispatch(ctx, _changes(resources={resource.id}))


@hookimpl
def qrm_resource_removed(resource: ResourcePublic, ctx: HookContext) -> None:
    """Drop the host of a removed resource."""
    _dispatch(ctx, _changes(removed_resources={resource.id}))


@hookimpl
def qrm_resource_state_changed(resource: ResourcePublic, old_state: str, ctx: HookContext) -> None:
    """Tell Nagios the agent's state at once (its passive ``agent`` service)."""
    settings = _settings(ctx)
    if settings is None or not resource.ip:
        return
    try:
        from qrm_nagios import agent, control
        from qrm_nagios.service import active_service
        from qrm_nagios.store import ObjectStore

        service = active_service(settings, ctx.settings)
        if service is not None:
            service.agents_changed({resource.id})
            return
        lines, _codes = agent.result_lines(settings, ctx.settings, [resource])
        control.send(ObjectStore(settings, ctx.settings).command_file(), lines, timeout=5)
    except Exception as exc:  # noqa: BLE001 - an event hook must not raise
        text = exc.message if isinstance(exc, QrmError) else f"{type(exc).__name__}: {exc}"
        _record_failure(ctx, f"could not send the agent state of {resource.hostname or resource.mac}: {text}")


# -- virtual environments -------------------------------------------------------


@hookimpl
def qrm_ve_created(ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
    """A hostgroup for the new VE."""
    _dispatch(ctx, _changes(ves={ve.name}))


@hookimpl
def qrm_ve_updated(ve: VirtualEnvironmentPublic, changed: list[str], ctx: HookContext) -> None:
    """The VE's monitor checks changed: every member's services follow."""
    if "monitor" in changed:
        _dispatch(ctx, _changes(ve_members={ve.name}))


@hookimpl
def qrm_ve_removed(ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
    _dispatch(ctx, _changes(removed_ves={ve.name}))


@hookimpl
def qrm_ve_resource_assigned(
    ve: VirtualEnvironmentPublic, resource: ResourcePublic, ctx: HookContext
) -> None:
    """The resource joins the VE's hostgroup and gets its checks."""
    _dispatch(ctx, _changes(resources={resource.id}))


@hookimpl
def qrm_ve_resource_released(
    ve: VirtualEnvironmentPublic, resource: ResourcePublic, ctx: HookContext
) -> None:
    _dispatch(ctx, _changes(resources={resource.id}))


# -- storage and partitions --------------------------------------------------------


@hookimpl
def qrm_storage_added(storage: StorageServerPublic, ctx: HookContext) -> None:
    """A host (ping, NFS/iSCSI reachability) and a hostgroup for the storage server."""
    _dispatch(ctx, _changes(storage={storage.id: (storage.name, storage.type, storage.address)}))


@hookimpl
def qrm_storage_removed(storage: StorageServerPublic, ctx: HookContext) -> None:
    _dispatch(ctx, _changes(removed_storage={storage.id: storage.name}))


@hookimpl
def qrm_partition_created(partition: PartitionPublic, ctx: HookContext) -> None:
    if partition.resource_id is not None:
        _dispatch(ctx, _changes(resources={partition.resource_id}))


@hookimpl
def qrm_partition_state_changed(partition: PartitionPublic, old_state: str, ctx: HookContext) -> None:
    """A partition may have moved to another host (its Nagios parent)."""
    if partition.resource_id is not None:
        _dispatch(ctx, _changes(resources={partition.resource_id}))


# -- monitoring, services, commands ---------------------------------------------------


@hookimpl
def qrm_collect_health(resource: ResourcePublic, ctx: HookContext) -> list[HealthCheck]:
    """What Nagios says about the resource: a summary line, then one line per check."""
    try:
        settings = load_settings()
        if not settings.configured:
            return []
        from qrm_nagios import health

        return health.for_resource(settings, ctx.settings, resource)
    except Exception as exc:  # noqa: BLE001 - 'resource show' must work when Nagios does not
        text = exc.message if isinstance(exc, QrmError) else f"{type(exc).__name__}: {exc}"
        return [HealthCheck("nagios", "unknown", f"Nagios: status not available: {text}")]


@hookimpl
def qrm_console_links(object_type: str, object_name: str, ctx: HookContext) -> list[ConsoleLink]:
    """A link to the Nagios page of a resource or storage server (with ``host_url`` set)."""
    try:
        settings = load_settings()
        if not settings.configured:
            return []
        from qrm_nagios import health

        return health.links(settings, ctx.settings, object_type, object_name)
    except Exception as exc:  # noqa: BLE001 - an object's page must show when Nagios cannot
        ctx.log.warning("nagios: no console link for %s %s: %s", object_type, object_name, exc)
        return []


@hookimpl
def qrm_console_panels(object_type: str, object_name: str, ctx: HookContext) -> list[ConsolePanel]:
    """Nagios's view of a resource or storage server (each check), or of a VE (each member)."""
    try:
        settings = load_settings()
        if not settings.configured:
            return []
        from qrm_nagios import health

        return health.panels(settings, ctx.settings, object_type, object_name)
    except Exception as exc:  # noqa: BLE001 - an object's page must show when Nagios cannot
        text = exc.message if isinstance(exc, QrmError) else f"{type(exc).__name__}: {exc}"
        return [
            ConsolePanel(title="Nagios", rows=(("state", f"status not available: {text}"),), status="unknown")
        ]


@hookimpl
def qrm_collect_services(ctx: HookContext) -> list[BackgroundService]:
    """The plugin's worker (and a managed Nagios, with ``QRM_NAGIOS_MANAGE=true``)."""
    settings = load_settings()
    if not settings.configured:
        return []
    from qrm_nagios.service import NagiosService

    service: Any = NagiosService(settings, ctx.settings)
    return [service]


@hookimpl
def qrm_register_commands(app: typer.Typer) -> None:
    """``qrm nagios ...``: status, sync, show."""
    from qrm_nagios.cli import app as nagios_app

    app.add_typer(nagios_app, name="nagios")
