"""Every pluggy hook specification of qrm, grouped by concern.

A plugin is a module (named by an entry point in the ``qrm.plugins`` group)
holding functions decorated with :data:`hookimpl` whose names match the
specifications below. An implementation may accept any subset of a hook's
arguments, by name.

How results combine:

* **Event hooks** (past tense, ``qrm_resource_added``; or present participle
  for the "before" side, ``qrm_ve_starting``) are broadcast to every plugin
  after the change is committed. They return nothing. A failing
  implementation is logged and recorded as an error event naming the plugin;
  the remaining plugins are still called and the change stands.
* **Collecting hooks** (``qrm_collect_*``, ``qrm_boot_kernel_args``) return a
  list from each plugin; the lists are concatenated in call order. A failing
  implementation raises :class:`qrm_core.errors.PluginError` naming the plugin,
  because a partial answer (a boot without a needed kernel argument) would be
  wrong.
* **Registration hooks** (``qrm_register_*``) hand the plugin an object to add
  things to; they return nothing.

Core calls hooks only through :class:`qrm_core.plugins.Hooks`.
``docs/hooks.md`` documents each hook with its literal signature; a test
keeps the two in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    import typer

    from qrm_core.config import Settings
    from qrm_core.context import BackgroundService, ConsoleLink, ConsolePanel, HealthCheck, HookContext
    from qrm_core.models import (
        BootImagePublic,
        EventPublic,
        FilesystemImagePublic,
        PartitionPublic,
        ResourcePublic,
        StorageServerPublic,
        VirtualEnvironmentPublic,
    )

PROJECT = "qrm"

hookspec = HookspecMarker(PROJECT)
hookimpl = HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------


@hookspec(historic=True)
def qrm_configure(settings: Settings) -> None:
    """Let a plugin read the settings once, after they are loaded.

    Called once per process when the plugins are loaded. Historic: a plugin
    registered later is called at registration.

    :param settings: The validated qrm settings.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_register_commands(app: typer.Typer) -> None:
    """Add the plugin's sub-commands to the ``qrm`` command line.

    Called once when the CLI is built. Add a sub-app with
    ``app.add_typer(my_app, name="xen")`` or single commands with
    ``app.command()``. A plugin must not replace core commands.

    :param app: The root ``qrm`` Typer application.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_register_routers(app: Any) -> None:
    """Add the plugin's HTTP routes to the qrm server.

    Called once when ``qrm server`` builds its FastAPI application. Routes
    should live under ``/api/v1/plugins/<plugin name>/``.

    :param app: The FastAPI application.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_collect_services(ctx: HookContext) -> list[BackgroundService]:
    """Contribute long-running services that ``qrm server`` starts and stops.

    Called once when the server starts. Results from all plugins are
    concatenated; the server starts them in that order and stops them in
    reverse order. A service with ``leader_only = True`` runs only on the
    server holding the engine's leader lock (see ``BackgroundService``).

    :param ctx: Hook context.
    :return: Services to run alongside the server.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


@hookspec
def qrm_event_recorded(event: EventPublic, ctx: HookContext) -> None:
    """Notify plugins of every audit event after it is committed.

    Broadcast. Failures of this hook are logged but not recorded as events
    themselves (that would loop).

    :param event: The recorded event.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------
# Resources (openQRM's resource hooks)
# ---------------------------------------------------------------------------


@hookspec
def qrm_resource_added(resource: ResourcePublic, ctx: HookContext) -> None:
    """Notify plugins that a resource was added (registered or entered by hand).

    Broadcast once per resource, after commit. DHCP plugins add a host
    reservation, monitoring plugins start watching it.

    :param resource: The new resource.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_resource_updated(resource: ResourcePublic, changed: list[str], ctx: HookContext) -> None:
    """Notify plugins that a resource's recorded facts changed (IP, hostname, size).

    Broadcast after commit; state changes have their own hook. A resource's
    MAC never changes (it is what identifies the machine), so a plugin keyed
    by MAC (DHCP reservations) can replace its entry.

    :param resource: The resource as it is now.
    :param changed: Names of the fields that changed.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_resource_state_changed(resource: ResourcePublic, old_state: str, ctx: HookContext) -> None:
    """Notify plugins that a resource moved from ``old_state`` to ``resource.state``.

    Broadcast after commit, once per transition.

    :param resource: The resource, in its new state.
    :param old_state: The state it left.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_resource_removed(resource: ResourcePublic, ctx: HookContext) -> None:
    """Notify plugins that a resource was removed from qrm.

    Broadcast after commit. DHCP plugins drop the reservation, monitoring
    plugins stop watching.

    :param resource: The resource as it was before removal.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------
# Virtual environments
# ---------------------------------------------------------------------------


@hookspec
def qrm_ve_created(ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
    """Notify plugins that a virtual environment was defined.

    :param ve: The new virtual environment.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_ve_updated(ve: VirtualEnvironmentPublic, changed: list[str], ctx: HookContext) -> None:
    """Notify plugins that a virtual environment's settings changed (``qrm ve set``).

    Broadcast after commit. Start, stop and membership have their own hooks;
    this one is for what the VE asks of plugins, such as its ``monitor``
    checks.

    :param ve: The virtual environment as it is now.
    :param changed: Names of the fields that changed.
    :param ctx: Hook context.

    .. versionadded:: 0.2
    """


@hookspec
def qrm_ve_removed(ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
    """Notify plugins that a virtual environment was removed.

    :param ve: The virtual environment as it was.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_ve_starting(ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
    """Notify plugins that a virtual environment was asked to run.

    Broadcast after the request is committed, before resources are chosen.

    :param ve: The virtual environment.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_ve_started(ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
    """Notify plugins that every resource of a virtual environment is active.

    :param ve: The virtual environment, now running.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_ve_stopping(ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
    """Notify plugins that a virtual environment was asked to stop.

    :param ve: The virtual environment.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_ve_stopped(ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
    """Notify plugins that a virtual environment released all its resources.

    :param ve: The virtual environment, now stopped.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_ve_resource_assigned(
    ve: VirtualEnvironmentPublic, resource: ResourcePublic, ctx: HookContext
) -> None:
    """Notify plugins that a resource was assigned to a virtual environment.

    Broadcast after commit, before the resource reboots into the VE. The
    engine itself grants the resource access to the filesystem image through
    the storage driver (``export_volume``); plugins react here (a boot plugin
    regenerates the resource's boot configuration).

    :param ve: The virtual environment.
    :param resource: The resource now serving it.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_ve_resource_released(
    ve: VirtualEnvironmentPublic, resource: ResourcePublic, ctx: HookContext
) -> None:
    """Notify plugins that a resource no longer serves a virtual environment.

    Broadcast after commit (VE stopped, pool shrunk, resource failed over).

    :param ve: The virtual environment.
    :param resource: The resource it released.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


@hookspec
def qrm_storage_added(storage: StorageServerPublic, ctx: HookContext) -> None:
    """Notify plugins that a storage server was added.

    :param storage: The new storage server.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_storage_removed(storage: StorageServerPublic, ctx: HookContext) -> None:
    """Notify plugins that a storage server was removed.

    :param storage: The storage server as it was.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_filesystem_image_added(image: FilesystemImagePublic, ctx: HookContext) -> None:
    """Notify plugins that a filesystem image was added (imported or created).

    :param image: The new filesystem image.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_filesystem_image_removed(image: FilesystemImagePublic, ctx: HookContext) -> None:
    """Notify plugins that a filesystem image was removed.

    :param image: The filesystem image as it was.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------
# Boot
# ---------------------------------------------------------------------------


@hookspec
def qrm_boot_image_added(boot_image: BootImagePublic, ctx: HookContext) -> None:
    """Notify plugins that a boot image was added.

    :param boot_image: The new boot image.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_boot_image_removed(boot_image: BootImagePublic, ctx: HookContext) -> None:
    """Notify plugins that a boot image was removed.

    :param boot_image: The boot image as it was.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_boot_kernel_args(
    resource: ResourcePublic,
    ve: VirtualEnvironmentPublic | None,
    boot_image: BootImagePublic,
    ctx: HookContext,
) -> list[str]:
    """Contribute kernel arguments for the next boot of a resource.

    Called whenever the boot configuration of a resource is generated (the
    per-MAC boot script). ``ve`` is None for an idle boot. Results from all
    plugins are concatenated after the boot image's own command line and the
    VE's root description. Each argument must be a single ``key`` or
    ``key=value`` token without whitespace; core rejects anything else.

    :param resource: The resource that boots.
    :param ve: The virtual environment it boots into, or None when idle.
    :param boot_image: The boot image it boots.
    :param ctx: Hook context.
    :return: Kernel arguments.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------
# Partitioning (virtualization)
# ---------------------------------------------------------------------------


@hookspec
def qrm_partition_created(partition: PartitionPublic, ctx: HookContext) -> None:
    """Notify plugins that a hypervisor driver created a partition (a VM).

    :param partition: The new partition.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_partition_state_changed(partition: PartitionPublic, old_state: str, ctx: HookContext) -> None:
    """Notify plugins that a partition moved from ``old_state`` to ``partition.state``.

    Called after commit, whoever moved it: an operator (``qrm partition
    start|stop|pause|resume``, a migration), the engine (fencing), or a
    hypervisor plugin reporting a change made behind qrm's back
    (``observe_partition_state``, ``sync_host``).

    :param partition: The partition in its new state.
    :param old_state: The state it left.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


@hookspec
def qrm_partition_removed(partition: PartitionPublic, ctx: HookContext) -> None:
    """Notify plugins that a partition was destroyed.

    :param partition: The partition as it was.
    :param ctx: Hook context.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------
# Monitoring
# ---------------------------------------------------------------------------


@hookspec
def qrm_collect_health(resource: ResourcePublic, ctx: HookContext) -> list[HealthCheck]:
    """Contribute health observations of a resource.

    Called when a resource is shown (``qrm resource show``, the API) and by
    monitoring views. Results from all plugins are concatenated.

    :param resource: The resource asked about.
    :param ctx: Hook context.
    :return: Observations, possibly empty.

    .. versionadded:: 0.1
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------
# Console
# ---------------------------------------------------------------------------


@hookspec
def qrm_console_links(object_type: str, object_name: str, ctx: HookContext) -> list[ConsoleLink]:
    """Contribute links to other tools' views of an object (Nagios, Webmin).

    Called when an object is shown (the console's object pages, ``qrm
    resource show``). Results from all plugins are concatenated.

    :param object_type: One of :data:`qrm_core.context.CONSOLE_OBJECT_TYPES`.
    :param object_name: The object's name (a resource's MAC).
    :param ctx: Hook context.
    :return: Links, possibly empty.

    .. versionadded:: 0.2
    """
    raise NotImplementedError


@hookspec
def qrm_console_panels(object_type: str, object_name: str, ctx: HookContext) -> list[ConsolePanel]:
    """Contribute panels of facts to an object's page (a DHCP lease, a monitoring state).

    Called when an object is shown, like :func:`qrm_console_links`; keep it
    fast (report what is known, do not probe).

    :param object_type: One of :data:`qrm_core.context.CONSOLE_OBJECT_TYPES`.
    :param object_name: The object's name (a resource's MAC).
    :param ctx: Hook context.
    :return: Panels, possibly empty.

    .. versionadded:: 0.2
    """
    raise NotImplementedError
