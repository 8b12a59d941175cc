"""Printing results: rich tables for people, stable JSON for programs."""

from __future__ import annotations

import enum
import json
import operator
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table


class Output(enum.StrEnum):
    table = "table"
    json = "json"


Column = tuple[str, Callable[[Any], Any]]


def columns(*spec: str | tuple[str, str | Callable[[Any], Any]]) -> list[Column]:
    """Table columns for :func:`show_list`.

    Each is an attribute name (``"memory_mb"``: header ``MEMORY MB``) or a
    ``(header, attribute name or function of the item)`` pair.
    """
    result: list[Column] = []
    for item in spec:
        header, getter = (item.upper().replace("_", " "), item) if isinstance(item, str) else item
        result.append((header, operator.attrgetter(getter) if isinstance(getter, str) else getter))
    return result


_console: Console | None = None


def console() -> Console:
    global _console
    if _console is None:
        _console = Console(soft_wrap=False, highlight=False)
        if not _console.is_terminal:
            _console.soft_wrap = True  # piped: a message stays one line, whatever its length
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
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items()) if value else "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    text = str(value)
    return text if text else "-"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _plain_cell(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _plain_rows(rows: list[list[str]]) -> None:
    """Aligned columns, two spaces apart, every value whole on its line: what
    ``qrm ... | grep`` or ``| awk`` needs (a boxed table wraps long values,
    a MAC across two lines, when the output is not a terminal)."""
    widths = [max(cell_len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = sys.stdout
    console()._qrm_printed = True  # type: ignore[attr-defined]
    for row in rows:
        cells = [cell + " " * (widths[i] - cell_len(cell)) for i, cell in enumerate(row[:-1])]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
    out.flush()


def plain() -> bool:
    """Tables become plain aligned text when the output is not a terminal."""
    return not console().is_terminal


def show_list(
    items: Sequence[Any], columns: Sequence[Column], output: Output, title: str | None = None
) -> None:
    if output is Output.json:
        print_json(list(items))
        return
    if plain():
        if not items:
            sys.stdout.write(f"(no {title.lower() if title else 'entries'})\n")
            return
        if title and getattr(console(), "_qrm_printed", False):
            # A second table of one command (a host's partitions below the
            # host): its title after a blank line. A list alone has none, so
            # that '| awk NR>1' skips just the header.
            sys.stdout.write(f"\n{title}\n")
        rows = [[header for header, _ in columns]]
        rows += [[_plain_cell(fmt(getter(item))) for _, getter in columns] for item in items]
        _plain_rows(rows)
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
    rows: list[list[str]] = []
    if fields is None:
        data = to_jsonable(item) if isinstance(item, BaseModel) else dict(item)
        for key, value in data.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                continue  # a list of objects: shown by the command as a table of its own
            if isinstance(getattr(item, key, None), BaseModel):
                continue  # an object: likewise
            rows.append([key.replace("_", " "), fmt(getattr(item, key, value))])
    else:
        rows = [[header, fmt(getter(item))] for header, getter in fields]
    if plain():
        if rows:
            _plain_rows([[field, _plain_cell(value)] for field, value in rows])
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field, value in rows:
        table.add_row(field, _escape(value))
    console().print(table)


def message(text: str, output: Output = Output.table) -> None:
    """A confirmation line for people; silent in JSON mode (the object is printed instead)."""
    if output is Output.table:
        console().print(_escape(text))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
