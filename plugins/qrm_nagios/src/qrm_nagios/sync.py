"""Keeping Nagios's objects in step with qrm: all at once, or only what changed.

A change of qrm is described by :class:`Changes` (which resources, VEs and
storage servers to look at again); :func:`apply_changes` renders just their
files and hands them to :class:`~qrm_nagios.store.ObjectStore`, which writes,
checks, renames and reloads. :func:`full_sync` renders everything, compares it
with every file and removes the files of objects that are gone.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from qrm_core.plugin_api import EventLevel, Settings
from qrm_nagios import render, source
from qrm_nagios.render import Rendered
from qrm_nagios.settings import NagiosSettings
from qrm_nagios.store import ApplyReport, ObjectStore
from qrm_nagios.watch import Note

log = logging.getLogger("qrm.plugins.nagios")


@dataclass
class Changes:
    """qrm objects whose Nagios files must be looked at again."""

    resources: set[int] = field(default_factory=set)
    removed_resources: set[int] = field(default_factory=set)
    ves: set[str] = field(default_factory=set)  # the VE's hostgroup
    ve_members: set[str] = field(default_factory=set)  # every member's host file (monitor checks changed)
    removed_ves: set[str] = field(default_factory=set)
    storage: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> (name, type, address)
    removed_storage: dict[int, str] = field(default_factory=dict)  # id -> name

    def __bool__(self) -> bool:
        return bool(
            self.resources
            or self.removed_resources
            or self.ves
            or self.ve_members
            or self.removed_ves
            or self.storage
            or self.removed_storage
        )

    def merge(self, other: Changes) -> None:
        self.resources |= other.resources
        self.removed_resources |= other.removed_resources
        self.resources -= other.removed_resources
        self.ves |= other.ves
        self.ve_members |= other.ve_members
        self.removed_ves |= other.removed_ves
        self.ves -= other.removed_ves
        self.storage.update(other.storage)
        self.removed_storage.update(other.removed_storage)
        for storage_id in other.removed_storage:
            self.storage.pop(storage_id, None)


def render_changes(
    settings: NagiosSettings, core: Settings, changes: Changes
) -> tuple[dict[str, str | None], Rendered]:
    """The files of the changed objects (None: remove), reading only those objects."""
    desired: dict[str, str | None] = {}
    rendered = Rendered()
    with source.reading(core) as ctx:
        facts = source.VeFacts(ctx)
        ids = set(changes.resources)
        for name in sorted(changes.ve_members):
            ids |= {r.id for r in source.ve_members(ctx, name)}
        for resource_id, resource in source.resources_by_id(ctx, ids - changes.removed_resources).items():
            path = render.host_path(resource_id)
            if resource is None or not resource.ip:
                desired[path] = None
                continue
            one = render.render_host(settings, source.host_record(resource, facts))
            rendered.merge(one)
            desired[path] = one.files.get(path)
    for resource_id in changes.removed_resources:
        desired[render.host_path(resource_id)] = None
    for name in sorted(changes.ves):
        one = render.render_ve_group(name)
        rendered.merge(one)
        desired.update(one.files)
    for name in sorted(changes.removed_ves):
        try:
            desired[render.ve_group_path(name)] = None
        except render.RenderProblem:
            pass
    for storage_id, (name, kind, address) in sorted(changes.storage.items()):
        record = render.StorageRecord(storage_id=storage_id, name=name, type=kind, address=address)
        one = render.render_storage(settings, record)
        one.merge(render.render_storage_group(name))
        rendered.merge(one)
        desired[render.storage_path(storage_id)] = one.files.get(render.storage_path(storage_id))
        desired.update({k: v for k, v in one.files.items() if k.startswith("groups/")})
    for storage_id, name in sorted(changes.removed_storage.items()):
        desired[render.storage_path(storage_id)] = None
        try:
            desired[render.storage_group_path(name)] = None
        except render.RenderProblem:
            pass
    return desired, rendered


def render_everything(settings: NagiosSettings, core: Settings, store: ObjectStore) -> Rendered:
    """Every file qrm's objects need, from one read of the database."""
    started = time.perf_counter()
    inventory = source.inventory(core)
    read = time.perf_counter() - started
    rendered = Rendered(read_seconds=read)
    rendered.files[render.BASE_FILE] = render.render_base(settings, store.interval_length())
    for name in inventory.ves:
        rendered.merge(render.render_ve_group(name))
    for record in inventory.storage:
        rendered.merge(render.render_storage(settings, record))
        rendered.merge(render.render_storage_group(record.name))
    for host in inventory.hosts:
        rendered.merge(render.render_host(settings, host))
    log.debug("nagios: read qrm in %.3f s, rendered %d files", read, len(rendered.files))
    return rendered


@dataclass
class SyncResult:
    report: ApplyReport
    rendered: Rendered
    diff: str = ""
    render_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.report.to_dict(),
            "files": len(self.rendered.files),
            "hosts": len(self.rendered.hosts),
            "render_seconds": round(self.render_seconds, 4),
        }


def full_sync(
    settings: NagiosSettings,
    core: Settings,
    *,
    dry_run: bool = False,
    with_diff: bool = False,
    reload: bool = True,
) -> SyncResult:
    """Render everything, compare it with the files Nagios runs, and apply the difference."""
    store = ObjectStore(settings, core)
    started = time.perf_counter()
    rendered = render_everything(settings, core, store)
    render_seconds = time.perf_counter() - started
    diff = ""
    if with_diff:
        diff = unified_diff(store, rendered.files)
    report = store.apply(dict(rendered.files), complete=True, dry_run=dry_run, reload=reload)
    report.problems.extend(rendered.problems)
    report.timings["read"] = rendered.read_seconds
    report.timings["render"] = render_seconds - rendered.read_seconds
    return SyncResult(report=report, rendered=rendered, diff=diff, render_seconds=render_seconds)


def apply_changes(settings: NagiosSettings, core: Settings, changes: Changes) -> ApplyReport:
    return apply_changes_with_texts(settings, core, changes)[1]


def apply_changes_with_texts(
    settings: NagiosSettings, core: Settings, changes: Changes
) -> tuple[dict[str, str | None], ApplyReport]:
    """Render the files of the changed objects only, and apply them; the texts rendered and the report.

    Until a first full sync has written the shared definitions (``qrm-base.cfg``)
    a change does that full sync instead."""
    store = ObjectStore(settings, core)
    if store.read(render.BASE_FILE) is None:
        result = full_sync(settings, core)
        return dict(result.rendered.files), result.report
    started = time.perf_counter()
    desired, rendered = render_changes(settings, core, changes)
    seconds = time.perf_counter() - started
    if not desired:
        report = ApplyReport(check="nothing to change")
    else:
        report = store.apply(desired)
    report.problems.extend(rendered.problems)
    report.timings["render"] = seconds
    return desired, report


def object_of(settings: NagiosSettings, rel: str, text: str | None) -> tuple[str, str]:
    """The qrm object a file belongs to: (object type, name) for events."""
    if rel.startswith("groups/ve-"):
        return ("ve", rel.removeprefix("groups/ve-").removesuffix(".cfg"))
    if rel.startswith("groups/storage-"):
        return ("storage", rel.removeprefix("groups/storage-").removesuffix(".cfg"))
    if text:
        match = re.search(r"^\s*host_name\s+(\S+)\s*$", text, re.M)
        if match:
            owner = render.label_of(settings, match.group(1))
            if owner is not None:
                return owner
    return ("plugin", "nagios")


def notes_for(
    settings: NagiosSettings, report: ApplyReport, texts: dict[str, str] | dict[str, str | None]
) -> list[Note]:
    """Events for what Nagios refused and what could not be monitored."""
    notes: list[Note] = []
    for rel, reason in sorted(report.rejected.items()):
        object_type, name = object_of(settings, rel, texts.get(rel))
        notes.append(
            Note(
                EventLevel.ERROR,
                object_type,
                name,
                f"nagios: Nagios rejected the new {rel}, it keeps running the previous one: {reason}",
            )
        )
    for problem in report.problems:
        notes.append(Note(EventLevel.WARNING, "plugin", "nagios", f"nagios: {problem}"))
    return notes


def unified_diff(store: ObjectStore, files: dict[str, str]) -> str:
    """What would change, as a unified diff of the object files (current -> rendered)."""
    current = store.snapshot()
    out: list[str] = []
    for rel in sorted(set(current) | set(files)):
        old, new = current.get(rel), files.get(rel)
        if old == new:
            continue
        out.extend(
            difflib.unified_diff(
                (old or "").splitlines(keepends=True),
                (new or "").splitlines(keepends=True),
                fromfile=f"a/{rel}" if old is not None else "/dev/null",
                tofile=f"b/{rel}" if new is not None else "/dev/null",
            )
        )
    return "".join(out)
