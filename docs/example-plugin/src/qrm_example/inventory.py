"""The inventory file: every resource qrm knows, as JSON, for other programs.

Format (``format`` is bumped on any incompatible change)::

    {
      "format": 1,
      "updated_at": "2024-05-01T12:00:00+00:00",
      "resources": [
        {"id": 1, "mac": "52:54:00:12:34:56", "ip": "10.0.0.5", "hostname": "node1",
         "kind": "physical", "state": "idle", "ve": null, "cpus": 4, "memory_mb": 8192}
      ]
    }

Resources are sorted by id. Several qrm processes (the server, CLI calls)
may change the file at once, so every change is a read-modify-write under an
exclusive ``flock`` on a lock file beside it, and the new content replaces the
old atomically (readers never see half a file).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qrm_core.errors import QrmError

if TYPE_CHECKING:
    from qrm_core.models import ResourcePublic

FORMAT = 1
#: The fields of a resource that the inventory keeps, in this order.
FIELDS = ("id", "mac", "ip", "hostname", "kind", "state", "ve", "cpus", "memory_mb")


class InventoryError(QrmError):
    """The inventory file cannot be read or written."""

    code = "inventory_error"
    http_status = 500


def entry(resource: ResourcePublic) -> dict[str, Any]:
    """The inventory entry of one resource."""
    return {name: getattr(resource, name) for name in FIELDS}


def _parse(path: Path, text: str) -> dict[int, dict[str, Any]]:
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {FORMAT}")
        return {int(item["id"]): item for item in data["resources"]}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InventoryError(
            f"inventory {path} is not valid ({exc}); rebuild it with 'qrm example sync'"
        ) from None


def read(path: Path) -> list[dict[str, Any]]:
    """The resources in the inventory, by id; empty if there is no file yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InventoryError(f"cannot read inventory {path}: {exc.strerror}") from None
    return [item for _, item in sorted(_parse(path, text).items())]


@contextmanager
def _locked(path: Path, *, fresh: bool = False) -> Iterator[dict[int, dict[str, Any]]]:
    """Yield the entries by id under an exclusive lock; write them back if changed.

    ``fresh`` starts from nothing instead of the current content (rebuild).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a+")  # closed by the with below
    except OSError as exc:
        raise InventoryError(f"cannot write inventory {path}: {exc.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries: dict[int, dict[str, Any]] = {}
        if not fresh and path.exists():
            entries = _parse(path, path.read_text(encoding="utf-8"))
        before = json.dumps(entries, sort_keys=True)
        yield entries
        if fresh or json.dumps(entries, sort_keys=True) != before or not path.exists():
            _write(path, entries)


def _write(path: Path, entries: dict[int, dict[str, Any]]) -> None:
    document = {
        "format": FORMAT,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "resources": [item for _, item in sorted(entries.items())],
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InventoryError(f"cannot write inventory {path}: {exc.strerror}") from None


def record(path: Path, resource: ResourcePublic) -> None:
    """Add or update one resource."""
    with _locked(path) as entries:
        entries[resource.id] = entry(resource)


def forget(path: Path, resource_id: int) -> None:
    """Drop one resource; dropping one that is not there is not an error."""
    with _locked(path) as entries:
        entries.pop(resource_id, None)


def rebuild(path: Path, resources: Iterable[ResourcePublic]) -> int:
    """Replace the whole inventory (after events were missed); returns the count."""
    with _locked(path, fresh=True) as entries:
        for resource in resources:
            entries[resource.id] = entry(resource)
        return len(entries)
