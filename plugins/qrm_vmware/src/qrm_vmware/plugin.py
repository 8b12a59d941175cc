"""qrm-vmware's hooks: the ``qrm vmware`` commands and the background sync of ``qrm server``.

Every qrm process imports this module at start-up, so it imports no SDK:
pyVmomi is imported by the driver, the sync and the watcher, when they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qrm_core.plugin_api import hookimpl

if TYPE_CHECKING:
    import typer

    from qrm_core.plugin_api import BackgroundService, ConsoleLink, ConsolePanel, HookContext


@hookimpl
def qrm_register_commands(app: typer.Typer) -> None:
    """Add ``qrm vmware connect|list|show|remove|sync``."""
    from qrm_vmware.cli import app as vmware_app

    app.add_typer(vmware_app, name="vmware")


@hookimpl
def qrm_collect_services(ctx: HookContext) -> list[BackgroundService]:
    """The periodic sync of every vCenter connection and the watchers of their updates
    (off with ``QRM_VMWARE_RUN_SYNC=false``). pyVmomi is imported here, when the
    server starts, never by other qrm commands."""
    from qrm_vmware.settings import load

    settings = load()
    if not settings.run_sync:
        return []
    from qrm_vmware.service import SyncService

    service: Any = SyncService(ctx.settings, settings)
    return [service]


def _connection_of(object_type: str, object_name: str, ctx: HookContext) -> Any:
    """The vCenter connection that manages a host resource (None for anything else)."""
    if object_type != "resource":
        return None
    from qrm_core.plugin_api import read_context, show_resource
    from qrm_vmware.connections import ConnectionStore
    from qrm_vmware.settings import load

    with read_context(ctx.settings) as rctx:
        resource = show_resource(rctx, object_name)
        manager = resource.managed_by or ""
        if not manager.startswith("vmware:"):
            return None
        return ConnectionStore(ctx.settings, load()).get(
            rctx, manager.removeprefix("vmware:"), with_password=False
        )


@hookimpl
def qrm_console_links(object_type: str, object_name: str, ctx: HookContext) -> list[ConsoleLink]:
    """The vSphere Client of the vCenter (or ESXi host) that manages a host resource."""
    from qrm_core.plugin_api import ConsoleLink, QrmError

    try:
        connection = _connection_of(object_type, object_name, ctx)
    except QrmError as exc:
        ctx.log.warning("vmware: no console link for %s %s: %s", object_type, object_name, exc.message)
        return []
    if connection is None or not connection.host:
        return []
    host = f"[{connection.host}]" if ":" in connection.host else connection.host
    return [ConsoleLink(title=f"vSphere Client ({connection.name})", url=f"https://{host}/ui/")]


@hookimpl
def qrm_console_panels(object_type: str, object_name: str, ctx: HookContext) -> list[ConsolePanel]:
    """What qrm knows of a host resource's vCenter: the connection, its endpoint, the last sync."""
    from qrm_core.plugin_api import ConsolePanel, QrmError

    try:
        connection = _connection_of(object_type, object_name, ctx)
    except QrmError as exc:
        return [
            ConsolePanel(title="VMware", rows=(("state", f"not available: {exc.message}"),), status="unknown")
        ]
    if connection is None:
        return []
    result = connection.last_sync_result or "not synced yet"
    failed = bool(connection.last_sync_result) and not connection.last_sync_result.startswith("ok")
    rows = (
        ("connection", connection.name),
        ("endpoint", connection.host),
        ("kind", "vCenter" if connection.api_type == "VirtualCenter" else connection.api_type or "unknown"),
        ("user", connection.username),
        ("last sync", f"{connection.last_sync or '-'}: {result}"),
    )
    return [ConsolePanel(title="VMware", rows=rows, status="warning" if failed else "ok")]
