"""``qrm example ...``: show the inventory, rebuild it from the database.

Mounted by :func:`qrm_example.plugin.qrm_register_commands`. Commands raise
:class:`~qrm_core.errors.QrmError` subclasses for anything a user can cause;
core's ``qrm`` prints their one-line message and exits 1.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any

import typer

from qrm_core.plugin_api import get_settings
from qrm_example import inventory, settings

app = typer.Typer(help="The example plugin: a machine-readable inventory of resources.", no_args_is_help=True)

COLUMNS = ("id", "mac", "ip", "hostname", "kind", "state", "ve", "cpus", "memory_mb")


class Output(enum.StrEnum):
    table = "table"
    json = "json"


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    header = [c.upper().replace("_", " ") for c in COLUMNS]
    body = [[_cell(row.get(c)) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    )


@app.command("inventory")
def show_inventory(
    output: Annotated[
        Output,
        typer.Option("--output", "-o", help="table for people, json for programs", case_sensitive=False),
    ] = Output.table,
) -> None:
    """Print the inventory file (kept up to date from resource events)."""
    path = settings.load(get_settings()).inventory_file
    assert path is not None
    rows = inventory.read(path)
    if output is Output.json:
        typer.echo(json.dumps(rows, indent=2, default=str))
    elif rows:
        typer.echo(_table(rows))
    else:
        typer.echo(f"(no resources in {path})")


@app.command("sync")
def sync() -> None:
    """Rebuild the inventory from the database (after the plugin was disabled, or the file lost)."""
    from qrm_core.plugin_api import list_resources, service_context

    core = get_settings()
    path = settings.load(core).inventory_file
    assert path is not None
    with service_context(core) as ctx:
        page = list_resources(ctx)
    count = inventory.rebuild(path, page.items)
    typer.echo(f"wrote {count} resource(s) to {path}")
