"""``qrm plugins``: what is installed, enabled and broken."""

from __future__ import annotations

from typing import Any

import typer

from qrm_core.cli.common import OutputOpt, client, sub_app
from qrm_core.cli.output import Output, columns, message, show_list

app = sub_app("Installed plugins and drivers.")


def problem(plugin: Any) -> str:
    """Why a plugin is not working, in a few words (empty when it is)."""
    return (
        plugin.error
        or (f"disabled with plugin {plugin.disabled_by}" if plugin.disabled_by else "")
        or (("missing: " + ", ".join(plugin.missing)) if plugin.missing else "")
    )


COLUMNS = columns("name", "kind", "version", "distribution", "status", ("PROBLEM", problem))


@app.command("list")
def list_(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """List every installed plugin and driver: version, state, and why it is broken."""
    show_list(client(ctx).plugins_list(), COLUMNS, output, "Plugins")


@app.command("enable")
def enable(ctx: typer.Context, name: str) -> None:
    """Enable a plugin or driver (persists)."""
    changed = client(ctx).plugins_set_enabled(name, True)
    message(f"enabled {name}" if changed else f"{name} is already enabled")


@app.command("disable")
def disable(ctx: typer.Context, name: str) -> None:
    """Disable a plugin or driver (persists); a disabled plugin's code is not loaded."""
    changed = client(ctx).plugins_set_enabled(name, False)
    message(f"disabled {name}" if changed else f"{name} is already disabled")
