"""qrm-nfs hook implementations: the ganesha service and the ``qrm nfs`` commands.

Imported by every qrm process at start-up, so it imports nothing heavy: the
driver, the service and the commands are imported when they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qrm_core.plugin_api import hookimpl

if TYPE_CHECKING:
    import typer

    from qrm_core.plugin_api import BackgroundService, HookContext


@hookimpl
def qrm_collect_services(ctx: HookContext) -> list[BackgroundService]:
    """Run nfs-ganesha (and rpcbind) with ``qrm server`` when QRM_NFS_RUN_GANESHA is set."""
    from qrm_nfs.settings import load_settings

    nfs = load_settings()
    if not nfs.run_ganesha:
        return []
    from qrm_nfs.service import GaneshaService

    service: Any = GaneshaService(ctx.settings, nfs)
    return [service]


@hookimpl
def qrm_register_commands(app: typer.Typer) -> None:
    """Add ``qrm nfs`` (status of the exports, re-sync of the export file)."""
    from qrm_nfs.cli import app as nfs_app

    app.add_typer(nfs_app, name="nfs")
