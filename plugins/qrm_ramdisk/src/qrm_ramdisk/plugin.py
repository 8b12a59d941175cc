"""qrm-ramdisk hook implementations: the HTTP route and the ``qrm ramdisk`` commands.

Imported by every qrm process at start-up, so it imports nothing heavy: the
route and the commands are imported when they are registered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qrm_core.plugin_api import hookimpl

if TYPE_CHECKING:
    import typer


@hookimpl
def qrm_register_routers(app: Any) -> None:
    """Serve ``/plugins/ramdisk/<storage>/<volume>`` (root filesystem archives) from qrm server."""
    from qrm_ramdisk.routes import router

    app.include_router(router)


@hookimpl
def qrm_register_commands(app: typer.Typer) -> None:
    """Add ``qrm ramdisk`` (import a root filesystem, list volumes)."""
    from qrm_ramdisk.cli import app as ramdisk_app

    app.add_typer(ramdisk_app, name="ramdisk")
