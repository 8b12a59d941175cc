"""The services layer: every domain rule of qrm lives here.

Services are plain functions taking a :class:`ServiceContext` (a database
session, the settings, the acting user and the plugin system) and keyword
arguments. They validate, change rows, record an :class:`~qrm_core.models.Event`
for every change, commit, and only then notify plugins. They return the
``*Public`` shapes of :mod:`qrm_core.models`; table rows never leave this
package. The CLI and the REST API (and the web console) call nothing else.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, StatementError
from sqlmodel import Session

from qrm_core.context import HookContext
from qrm_core.db import READONLY_OPTION, _short, ensure_current, get_engine
from qrm_core.errors import Conflict, DatabaseUnavailable, InvalidInput
from qrm_core.models import Event, EventLevel, EventPublic, utcnow

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem
    from qrm_core.plugins.hooks import Hooks

audit_log = logging.getLogger("qrm.audit")
log = logging.getLogger("qrm.services")


def default_actor(settings: Settings) -> str:
    if settings.actor:
        return settings.actor
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database entry (containers)
        return "unknown"


class ServiceContext:
    """One unit of work: a session, who is acting, and what to do after commit."""

    def __init__(
        self,
        session: Session,
        settings: Settings,
        actor: str,
        plugins: PluginSystem,
    ) -> None:
        self.session = session
        self.settings = settings
        self.actor = actor
        self.plugins = plugins
        self._after_commit: list[Callable[[], None]] = []
        self._events: list[Event] = []
        self._fast_events: list[dict[str, Any]] = []

    @property
    def hooks(self) -> Hooks:
        return self.plugins.hooks

    @property
    def hook_ctx(self) -> HookContext:
        return HookContext(settings=self.settings, actor=self.actor)

    # -- audit -----------------------------------------------------------

    def record(
        self,
        object_type: str,
        object_name: str,
        message: str,
        level: EventLevel = EventLevel.INFO,
        actor: str | None = None,
    ) -> Event:
        """Add an audit event to the current transaction."""
        event = Event(
            actor=(actor or self.actor)[:64],
            object_type=object_type,
            object_name=object_name[:128],
            level=level.value,
            message=message,
        )
        self.session.add(event)
        self._events.append(event)
        return event

    def record_fast(
        self,
        object_type: str,
        entries: list[tuple[str, str]],
        level: EventLevel = EventLevel.INFO,
    ) -> None:
        """Add audit events like :meth:`record`, one per ``(object name,
        message)``, with one INSERT and no ORM objects (for the paths that
        run per machine: registrations, placements). The same rows, the same
        audit log lines; a plugin that listens to ``qrm_event_recorded`` gets
        them through :meth:`record` instead."""
        if not entries:
            return
        if self.hooks.wants("qrm_event_recorded"):
            for object_name, message in entries:
                self.record(object_type, object_name, message, level)
            return
        now = utcnow()
        rows = [
            {
                "time": now,
                "actor": self.actor[:64],
                "object_type": object_type,
                "object_name": object_name[:128],
                "level": level.value,
                "message": message,
            }
            for object_name, message in entries
        ]
        self.session.connection().execute(_INSERT_EVENT, rows)
        self._fast_events.extend(rows)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the current transaction has committed."""
        self._after_commit.append(callback)

    def flush(self) -> None:
        """Write pending changes (to get ids) without committing; a unique
        violation here is a concurrent change, as in :meth:`commit`."""
        try:
            self.session.flush()
        except IntegrityError as exc:
            self.session.rollback()
            self._discard()
            raise Conflict(
                f"the change conflicts with a concurrent one and was not made: {_short(exc)}"
            ) from None
        except StatementError as exc:
            self._refuse_out_of_range(exc)
            raise

    def commit(self) -> None:
        """Commit; then write the audit log lines and notify plugins."""
        try:
            self.session.commit()
        except IntegrityError as exc:
            self.session.rollback()
            self._discard()
            raise Conflict(
                f"the change conflicts with a concurrent one and was not made: {_short(exc)}"
            ) from None
        except OperationalError as exc:
            self.session.rollback()
            self._discard()
            raise DatabaseUnavailable(f"database error: {_short(exc)}") from None
        except StatementError as exc:
            self._refuse_out_of_range(exc)
            raise
        events, self._events = self._events, []
        fast_events, self._fast_events = self._fast_events, []
        callbacks, self._after_commit = self._after_commit, []
        for event in events:
            write_audit_line(event)
        for row in fast_events:
            _audit_line(**row)
        if events and self.hooks.wants("qrm_event_recorded"):
            hook_ctx = self.hook_ctx
            for event in events:
                self.hooks.event_recorded(EventPublic.model_validate(event, from_attributes=True), hook_ctx)
        for callback in callbacks:
            callback()
        if self.session.in_transaction():
            # Reads made after the commit (results, hook payloads) end here.
            self.session.commit()

    def _refuse_out_of_range(self, exc: StatementError) -> None:
        """A value the database cannot hold (an integer beyond its column) is
        bad input, not a server failure: the services check ranges first
        (validation.MAX_INT); this catches what one of them missed."""
        if isinstance(exc, DataError) or isinstance(exc.orig, OverflowError):
            self.session.rollback()
            self._discard()
            raise InvalidInput(f"a value is out of range: {_short(exc)}") from None
        self.session.rollback()
        self._discard()

    def rollback(self) -> None:
        """Roll back, and forget what was to be recorded. Rows read in the
        transaction are expired: reading one again opens a new transaction (on
        SQLite the write lock), so take what a driver call needs into plain
        values first, or end a read with :meth:`commit`, which expires nothing."""
        self.session.rollback()
        self._discard()

    def _discard(self) -> None:
        self._events.clear()
        self._fast_events.clear()
        self._after_commit.clear()


def write_audit_line(event: Event) -> None:
    """One line per event in the audit log; newlines in messages are escaped."""
    _audit_line(event.time, event.actor, event.object_type, event.object_name, event.level, event.message)


def _audit_line(
    time: datetime, actor: str, object_type: str, object_name: str, level: str, message: str
) -> None:
    message = message.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    audit_log.info(
        "%s actor=%s object=%s:%s level=%s %s",
        time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        actor,
        object_type,
        object_name or "-",
        level,
        message,
    )


_INSERT_EVENT = sa.insert(Event.__table__)  # type: ignore[attr-defined]


def _record_plugin_failure(
    settings: Settings, plugins: PluginSystem
) -> Callable[[str, str, BaseException], None]:
    def record(plugin: str, hook: str, exc: BaseException) -> None:
        engine = get_engine(settings)
        with Session(engine, expire_on_commit=False) as session:
            event = Event(
                actor="plugin:" + plugin,
                object_type="plugin",
                object_name=plugin,
                level=EventLevel.ERROR.value,
                message=f"plugin {plugin} failed in {hook}: {exc}",
            )
            session.add(event)
            session.commit()
            write_audit_line(event)

    return record


@contextmanager
def service_context(
    settings: Settings,
    *,
    actor: str | None = None,
    plugins: PluginSystem | None = None,
    check_schema: bool = True,
    readonly: bool = False,
) -> Iterator[ServiceContext]:
    """Open a :class:`ServiceContext` on the configured database.

    ``readonly`` contexts (lookups on hot paths, such as boot configurations)
    never take SQLite's write lock, so they never wait behind a writer; they
    must not write.
    """
    from qrm_core.plugins import get_plugin_system

    engine = get_engine(settings)
    if check_schema:
        ensure_current(engine)
    system = plugins if plugins is not None else get_plugin_system(settings)
    if system.hooks.on_failure is None:
        system.hooks.on_failure = _record_plugin_failure(settings, system)
    bind = engine.execution_options(**{READONLY_OPTION: True}) if readonly else engine
    session = Session(bind, expire_on_commit=False)
    ctx = ServiceContext(session, settings, actor or default_actor(settings), system)
    try:
        yield ctx
    except OperationalError as exc:
        ctx.rollback()
        raise DatabaseUnavailable(f"database error: {_short(exc)}") from None
    except BaseException:
        ctx.rollback()
        raise
    finally:
        session.close()


_bare_systems: dict[int, PluginSystem] = {}


@contextmanager
def read_context(settings: Settings) -> Iterator[ServiceContext]:
    """A read-only :class:`ServiceContext` for plugins that only read (a
    configuration render from inside a hook): it never takes SQLite's write
    lock, so it never waits for the change that fired the hook, and it loads
    no plugins (it calls no hook). Writing through it is a bug."""
    from qrm_core.plugins import PluginSystem

    system = _bare_systems.get(id(settings))
    if system is None or system.settings is not settings:
        system = PluginSystem(settings, discover_plugins=False)
        _bare_systems[id(settings)] = system
    with service_context(settings, plugins=system, readonly=True, actor="plugin") as ctx:
        yield ctx
