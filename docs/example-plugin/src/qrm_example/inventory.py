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

Resources are sorted by id, one per line. Several qrm processes (the server,
CLI calls) may change the file at once, so every change is a read-modify-write
under an exclusive ``flock`` on a lock file beside it, and the new content
replaces the old atomically (readers never see half a file).

The resource hooks run inside the request that made the change (an agent's
registration, 40 of them at once in the server's threads), so a change costs
what it touches, not the whole inventory. The first version parsed the whole
file, serialized it three times and rewrote it, twice per registration, one
thread at a time: 23 ms of CPU per registration at 2,000 resources, 61 ms at
5,000 (``bench/server/bench_register.py``, docs/benchmarks.md). Now:

* the process keeps the entries it last wrote, each already serialized as its
  line of the file, and parses the file again only when another process has
  replaced it since (its inode, size and modification time differ);
* inside ``qrm server`` a change is queued and the hook returns; a writer
  thread (:class:`Writer`, the plugin's background service) writes what is
  queued at most twice a second, so the file follows within about a second
  and a burst of registrations costs a few rewrites, not one each. Rewriting
  is still work that grows with the inventory (about 0.5 ms per 1,000
  resources), but no longer per change;
* elsewhere (a CLI call) each change is written before it returns, and
  changes from several threads that arrive while one is being written share
  the next write (group commit); each caller sees the error if it failed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qrm_core.plugin_api import QrmError

if TYPE_CHECKING:
    from qrm_core.plugin_api import ResourcePublic

log = logging.getLogger("qrm.example")

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


def _line(item: dict[str, Any]) -> str:
    """One resource as its line of the file (indented, no trailing comma)."""
    return "    " + json.dumps(item, default=str)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


#: A change: ("set", id, line), ("drop", id, "") or ("reset", 0, "") (start from nothing).
_Op = tuple[str, int, str]


class _Change:
    """Changes of one caller, waiting for a write (group commit)."""

    __slots__ = ("done", "error", "ops")

    def __init__(self, ops: list[_Op]) -> None:
        self.ops = ops
        self.done = False
        self.error: str | None = None


class _File:
    """What this process knows of one inventory file: its entries as last
    written or read (each already serialized as its line), the file's identity
    then, and the changes waiting for the next write."""

    def __init__(self) -> None:
        self.pending: list[_Change] = []
        self.pending_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.lines: dict[int, str] | None = None
        self.identity: tuple[int, int, int] | None = None

    def queue(self, ops: list[_Op]) -> _Change:
        """Add ``ops`` to the next write."""
        change = _Change(ops)
        with self.pending_lock:
            self.pending.append(change)
        return change

    def apply(self, path: Path, ops: list[_Op]) -> None:
        """Make the file hold ``ops``; return once it does (raises InventoryError)."""
        change = self.queue(ops)
        with self.write_lock:
            if not change.done:  # nobody wrote it meanwhile: write everything waiting
                self._write_pending(path, keep=False)
        if change.error is not None:
            raise InventoryError(change.error)

    def flush(self, path: Path) -> None:
        """Write what is queued (the server's writer); on failure it stays queued."""
        with self.write_lock:
            self._write_pending(path, keep=True)

    def _write_pending(self, path: Path, *, keep: bool) -> None:
        with self.pending_lock:
            batch, self.pending = self.pending, []
        if not batch:
            return
        try:
            self._write([op for c in batch for op in c.ops], path)
        except InventoryError as exc:
            for c in batch:
                c.error = exc.message
            if keep:
                with self.pending_lock:
                    self.pending[:0] = [_Change(c.ops) for c in batch]
                raise
        finally:
            for c in batch:
                c.done = True

    def _current(self, path: Path) -> dict[int, str]:
        """The entries in the file now: those kept, unless another process replaced the file."""
        try:
            identity = _identity(os.stat(path))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise InventoryError(f"cannot read inventory {path}: {exc.strerror}") from None
        if self.lines is not None and identity == self.identity:
            return self.lines
        text = path.read_text(encoding="utf-8")
        return {key: _line(item) for key, item in sorted(_parse(path, text).items())}

    def _write(self, ops: list[_Op], path: Path) -> None:
        resets = [i for i, (kind, _, _) in enumerate(ops) if kind == "reset"]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path.with_name(path.name + ".lock"), "a+")  # closed by the with below
        except OSError as exc:
            raise InventoryError(f"cannot write inventory {path}: {exc.strerror}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if resets:
                lines: dict[int, str] = {}
                ops = ops[resets[-1] + 1 :]
            else:
                lines = self._current(path)
            # The kept entries are changed in place: forgotten unless the write succeeds.
            self.lines, self.identity = None, None
            changed = bool(resets) or not path.exists()
            added: dict[int, str] = {}  # new ids: usually above every id in the file
            for kind, key, line in ops:
                if kind == "drop":
                    changed |= lines.pop(key, None) is not None or added.pop(key, None) is not None
                elif key in lines:
                    changed |= lines[key] != line
                    lines[key] = line
                else:
                    added[key] = line
            if added:
                changed = True
                if min(added) > next(reversed(lines), -1):
                    lines.update(sorted(added.items()))
                else:
                    lines.update(added)
                    lines = dict(sorted(lines.items()))
            if changed:
                _write_file(path, lines)
            self.lines, self.identity = lines, _identity(os.stat(path))


def _write_file(path: Path, lines: dict[int, str]) -> None:
    updated = json.dumps(datetime.now(UTC).isoformat(timespec="seconds"))
    body = "\n" + ",\n".join(lines.values()) + "\n  " if lines else ""
    text = f'{{\n  "format": {FORMAT},\n  "updated_at": {updated},\n  "resources": [{body}]\n}}\n'
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InventoryError(f"cannot write inventory {path}: {exc.strerror}") from None


_FILES: dict[Path, _File] = {}
_FILES_LOCK = threading.Lock()


def _file(path: Path) -> _File:
    with _FILES_LOCK:
        return _FILES.setdefault(path, _File())


class Writer:
    """The inventory's writer inside ``qrm server`` (a background service:
    :func:`qrm_example.plugin.qrm_collect_services`).

    While it runs, a change returns as soon as it is queued, and the writer
    writes everything queued at most every ``interval`` seconds: a burst of
    registrations costs a few rewrites of the file, not one each, and no
    registration waits for the file. A CLI call (no writer) writes before it
    returns. A failed write is logged and given to ``on_error`` (the plugin
    records an error event), and the changes stay queued for the next one;
    ``stop()`` writes what is left.
    """

    name = "example-inventory"

    def __init__(self, interval: float = 0.5, on_error: Callable[[str], None] | None = None) -> None:
        self.interval = interval
        self.on_error = on_error
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: set[Path] = set()  # files whose last write failed (reported once)

    def start(self) -> None:
        global _writer
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="qrm-example-inventory", daemon=True)
        self._thread.start()
        _writer = self

    def stop(self) -> None:
        global _writer
        if _writer is self:
            _writer = None
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()

    def notify(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return  # stop() writes what is left
            self._wake.clear()
            self.flush()
            self._stop.wait(self.interval)

    def flush(self) -> None:
        """Write every inventory file with queued changes."""
        with _FILES_LOCK:
            files = list(_FILES.items())
        for path, kept in files:
            try:
                kept.flush(path)
            except InventoryError as exc:
                log.error("%s", exc.message)
                if path not in self._failing and self.on_error is not None:
                    self.on_error(exc.message)
                self._failing.add(path)
            else:
                self._failing.discard(path)


#: The running server's writer, if any (Writer.start/stop).
_writer: Writer | None = None


def _forked() -> None:
    # A forked child starts without the parent's entries, locks (one held by
    # another thread at the fork would never be released) and writer thread.
    global _writer
    _FILES.clear()
    _writer = None


os.register_at_fork(after_in_child=_forked)


def _change(path: Path, ops: list[_Op]) -> None:
    writer = _writer
    if writer is not None:  # in the server: the writer writes it shortly
        _file(path).queue(ops)
        writer.notify()
    else:
        _file(path).apply(path, ops)


def record(path: Path, resource: ResourcePublic) -> None:
    """Add or update one resource (in the file on return, or shortly in the server)."""
    _change(path, [("set", resource.id, _line(entry(resource)))])


def forget(path: Path, resource_id: int) -> None:
    """Drop one resource; dropping one that is not there is not an error."""
    _change(path, [("drop", resource_id, "")])


def rebuild(path: Path, resources: Iterable[ResourcePublic]) -> int:
    """Replace the whole inventory (after events were missed); returns the count."""
    ops: list[_Op] = [("reset", 0, "")]
    ops += [("set", r.id, _line(entry(r))) for r in sorted(resources, key=lambda r: r.id)]
    _file(path).apply(path, ops)
    return len({key for _, key, _ in ops[1:]})
