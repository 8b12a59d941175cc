"""qrm-tftpd's hook implementations: the TFTP service for ``qrm server`` and ``qrm tftpd``.

Kept import-cheap (pluggy imports this module whenever qrm starts): the
server, tftpy and the settings class are imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qrm_core.plugin_api import hookimpl

if TYPE_CHECKING:
    import typer

    from qrm_core.plugin_api import BackgroundService, HookContext


@hookimpl
def qrm_collect_services(ctx: HookContext) -> list[BackgroundService]:
    """The TFTP service, unless ``QRM_TFTPD_ENABLED=false``."""
    from qrm_tftpd.service import TftpService
    from qrm_tftpd.settings import load_settings

    tftp = load_settings()
    if not tftp.enabled:
        ctx.log.info("tftp: not started (QRM_TFTPD_ENABLED=false)")
        return []
    return [TftpService(ctx.settings, tftp)]


@hookimpl
def qrm_register_commands(app: typer.Typer) -> None:
    """``qrm tftpd``: run the TFTP service in the foreground, check it, render boot files."""
    from qrm_tftpd.cli import app as tftpd_app

    app.add_typer(tftpd_app, name="tftpd")
