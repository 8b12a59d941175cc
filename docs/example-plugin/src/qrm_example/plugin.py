"""Keep a machine-readable inventory of resources and offer the example-dir storage.

This module is the ``example`` entry point of the ``qrm.plugins`` group. Every
qrm process imports it at start-up (unless the plugin is disabled), so it
imports only cheap things: the CLI module is imported when the CLI is built,
the storage driver only when stevedore is asked for ``example-dir``.

Event hooks do not catch their own errors here: if the inventory cannot be
written, core logs the failure and records an error event naming the plugin,
and the change that caused the event stands (docs/hooks.md, "How results
combine"). A hook that can repair or retry would catch and handle instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qrm_core.plugin_api import hookimpl
from qrm_example import inventory, settings

if TYPE_CHECKING:
    import typer

    from qrm_core.plugin_api import ConsoleLink, ConsolePanel, HookContext, ResourcePublic


def _inventory_file(ctx: HookContext) -> Path:
    path = settings.load(ctx.settings).inventory_file
    assert path is not None  # settings.load fills it in
    return path


# -- resource events ---------------------------------------------------------
# An implementation may take any subset of the hook's arguments, by name.


@hookimpl
def qrm_resource_added(resource: ResourcePublic, ctx: HookContext) -> None:
    inventory.record(_inventory_file(ctx), resource)


@hookimpl
def qrm_resource_updated(resource: ResourcePublic, ctx: HookContext) -> None:
    inventory.record(_inventory_file(ctx), resource)


@hookimpl
def qrm_resource_state_changed(resource: ResourcePublic, old_state: str, ctx: HookContext) -> None:
    ctx.log.debug("example: resource %s %s -> %s", resource.mac, old_state, resource.state)
    inventory.record(_inventory_file(ctx), resource)


@hookimpl
def qrm_resource_removed(resource: ResourcePublic, ctx: HookContext) -> None:
    inventory.forget(_inventory_file(ctx), resource.id)


@hookimpl
def qrm_collect_services(ctx: HookContext) -> list[inventory.Writer]:
    """In ``qrm server`` the inventory is written by a writer thread, not in
    each registration's request (see ``inventory.py``)."""
    core = ctx.settings

    def failed(message: str) -> None:
        from qrm_core.plugin_api import EventLevel, service_context

        with service_context(core, actor="plugin:example") as sctx:
            sctx.record("plugin", "example", f"plugin example: {message}", level=EventLevel.ERROR)
            sctx.commit()

    return [inventory.Writer(on_error=failed)]


# -- contributions -----------------------------------------------------------


@hookimpl
def qrm_boot_kernel_args(ctx: HookContext) -> list[str]:
    """Tell the booted system that an inventory is kept (only if configured)."""
    return ["qrm.inventory=1"] if settings.load(ctx.settings).kernel_arg else []


@hookimpl
def qrm_register_commands(app: typer.Typer) -> None:
    from qrm_example.cli import app as example_app

    app.add_typer(example_app, name="example")


# -- the web console -----------------------------------------------------------


@hookimpl
def qrm_console_panels(object_type: str, object_name: str, ctx: HookContext) -> list[ConsolePanel]:
    """On a resource's page: what the inventory file holds for it (plain data;
    the console escapes it and lays it out). ``object_name`` is the MAC."""
    from qrm_core.plugin_api import ConsolePanel

    if object_type != "resource":
        return []
    path = _inventory_file(ctx)
    found = [e for e in inventory.read(path) if e.get("mac") == object_name]
    if not found:
        return [
            ConsolePanel("Inventory", rows=(("file", str(path)), ("entry", "none yet")), status="unknown")
        ]
    entry = found[0]
    rows = tuple(
        (key, "-" if entry[key] is None else str(entry[key])) for key in ("state", "ip", "cpus", "memory_mb")
    )
    return [ConsolePanel("Inventory", rows=(("file", str(path)), *rows), status="ok")]


@hookimpl
def qrm_console_links(object_type: str) -> list[ConsoleLink]:
    """On the dashboard: where the inventory's format is described."""
    from qrm_core.plugin_api import ConsoleLink

    if object_type != "dashboard":
        return []
    return [ConsoleLink("Inventory format", "https://example.org/qrm-inventory")]
