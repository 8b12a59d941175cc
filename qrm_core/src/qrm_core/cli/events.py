"""``qrm events``: the audit log, the newest events or followed as they happen."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer

from qrm_core.cli.common import OutputOpt, client
from qrm_core.cli.output import Output, columns, show_list, to_jsonable
from qrm_core.client import Client


def object_label(event: Any) -> str:
    """``type:name`` of the object an event is about (the type alone if it has no name)."""
    return f"{event.object_type}:{event.object_name}" if event.object_name else event.object_type


COLUMNS = columns("time", "actor", ("OBJECT", object_label), "level", "message")


def events(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", "-l", help="how many of the newest events")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Show the newest events of the audit log."""
    source = client(ctx)
    shown = source.events(limit, None)
    if not follow:
        show_list(shown, COLUMNS, output, "Events")
        return
    follow_events(source, shown, output)


def follow_events(client: Client, shown: list[Any], output: Output) -> None:
    """Print events as they are recorded, one line each, until Ctrl-C."""

    def emit(event: Any) -> None:
        if output is Output.json:
            sys.stdout.write(json.dumps(to_jsonable(event)) + "\n")
        else:
            sys.stdout.write(
                f"{event.time:%Y-%m-%d %H:%M:%S} {event.actor} {object_label(event)} {event.level} "
                f"{event.message}\n"
            )
        sys.stdout.flush()

    last_id = 0
    for event in shown:
        emit(event)
        last_id = max(last_id, event.id)
    try:
        while True:
            time.sleep(1.0)
            for event in client.events(1000, last_id):
                emit(event)
                last_id = max(last_id, event.id)
    except KeyboardInterrupt:
        return
