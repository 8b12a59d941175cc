"""Printing results: rich tables for people, stable JSON for programs."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table


class Output(enum.StrEnum):
    table = "table"
    json = "json"


Column = tuple[str, Callable[[Any], Any]]

_console: Console | None = None


def console() -> Console:
    global _console
    if _console is None:
        _console = Console(soft_wrap=False, highlight=False)
    return _console


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(value), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value) if value else "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    text = str(value)
    return text if text else "-"


def show_list(
    items: Sequence[Any], columns: Sequence[Column], output: Output, title: str | None = None
) -> None:
    if output is Output.json:
        print_json(list(items))
        return
    table = Table(title=title, show_lines=False, header_style="bold")
    for header, _ in columns:
        table.add_column(header, overflow="fold")
    for item in items:
        table.add_row(*[_escape(fmt(getter(item))) for _, getter in columns])
    if not items:
        console().print(f"(no {title.lower() if title else 'entries'})")
        return
    console().print(table)


def show_one(item: Any, output: Output, fields: Sequence[Column] | None = None) -> None:
    if output is Output.json:
        print_json(item)
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    if fields is None:
        data = to_jsonable(item) if isinstance(item, BaseModel) else dict(item)
        for key, value in data.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                continue
            table.add_row(key.replace("_", " "), _escape(fmt(getattr(item, key, value))))
    else:
        for header, getter in fields:
            table.add_row(header, _escape(fmt(getter(item))))
    console().print(table)


def message(text: str, output: Output = Output.table) -> None:
    """A confirmation line for people; silent in JSON mode (the object is printed instead)."""
    if output is Output.table:
        console().print(_escape(text))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
