"""Database engine, sessions and schema migrations.

One URL chooses the backend: the embedded default is SQLite in WAL mode in the
data directory; PostgreSQL (``postgresql+psycopg://``) and MariaDB/MySQL
(``mysql+pymysql://``) work through the same code. The schema is only ever
created or changed by Alembic migrations (``qrm init``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlmodel import Session

from qrm_core.config import Settings
from qrm_core.errors import DatabaseUnavailable, NotInitialized

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


MYSQL_CHECK_VIOLATION = 4025


def _mysql_check_is_integrity(context: Any) -> Exception | None:
    """MariaDB reports a CHECK violation as an OperationalError; it is an integrity error."""
    orig = context.original_exception
    args = getattr(orig, "args", ())
    if args and args[0] == MYSQL_CHECK_VIOLATION:
        return IntegrityError(context.statement, context.parameters, orig)
    return None


READONLY_OPTION = "qrm_readonly"


class _WriterQueue:
    """One process's SQLite writers, queued in Python instead of in SQLite.

    SQLite lets one writer at a time hold the database. A writer that finds
    it held waits in SQLite's busy handler, which does not wake when the lock
    is freed: it sleeps 1, 2, 5, 10, 15, 20, 25 ... 100 ms and tries again.
    With 40 request threads registering at once (a rack powering on), most of
    them sleep while the lock is free, and registrations run at a fraction of
    what the database can take, with long tails. Here the writers of one
    process take a lock of the process before ``BEGIN IMMEDIATE`` and are
    woken the moment the previous writer commits or rolls back. Writers of
    other processes (a CLI command beside the server) still meet in SQLite's
    busy handler, as before.

    The lock is held per DBAPI connection from BEGIN IMMEDIATE to the end of
    its transaction (the dialect's commit or rollback, which the pool also
    issues when a connection is returned). A thread that already holds it for
    another connection (a write transaction opened inside another) does not
    wait for itself: it goes straight to SQLite, as before. A writer that
    waits longer than ``timeout`` goes to SQLite too, so nothing here can hang
    what SQLite alone would not.
    """

    def __init__(self, timeout: float = 30.0) -> None:
        self.lock = threading.Lock()
        self.timeout = timeout
        self.holder: int | None = None  # id() of the DBAPI connection holding it
        self.thread: int | None = None

    def enter(self, connection: Any) -> None:
        me = threading.get_ident()
        if self.thread == me:
            return
        if self.lock.acquire(timeout=self.timeout):
            self.holder = id(_raw(connection))
            self.thread = me

    def leave(self, connection: Any) -> None:
        # Any thread: FastAPI may end a transaction in another thread of its
        # pool than the one that began it (a dependency's teardown).
        if self.holder is not None and self.holder == id(_raw(connection)):
            self.holder = None
            self.thread = None
            self.lock.release()


def _raw(connection: Any) -> Any:
    """The DBAPI connection itself, given it or the pool's proxy of it."""
    return getattr(connection, "dbapi_connection", None) or connection


def _sqlite_begin(conn: Any) -> None:
    if conn.get_execution_options().get(READONLY_OPTION):
        conn.exec_driver_sql("BEGIN")
        return
    queue: _WriterQueue | None = getattr(conn.engine, "_qrm_writers", None)
    if queue is not None:
        queue.enter(conn.connection)
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        if queue is not None:
            queue.leave(conn.connection)
        raise


def _queue_sqlite_writers(engine: Engine) -> None:
    """Wrap the dialect's commit and rollback so a transaction's end frees the writers' lock."""
    queue = _WriterQueue()
    engine._qrm_writers = queue  # type: ignore[attr-defined]
    dialect = engine.dialect
    commit, rollback = dialect.do_commit, dialect.do_rollback

    def do_commit(connection: Any) -> None:
        try:
            commit(connection)
        finally:
            queue.leave(connection)

    def do_rollback(connection: Any) -> None:
        try:
            rollback(connection)
        finally:
            queue.leave(connection)

    dialect.do_commit = do_commit  # type: ignore[method-assign,assignment]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign,assignment]
    # A connection closed or invalidated in the middle of its transaction ends it too.
    event.listen(engine, "close", lambda dbapi_connection, _record: queue.leave(dbapi_connection))
    event.listen(engine, "invalidate", lambda dbapi_connection, _record, _exc: queue.leave(dbapi_connection))


def create_db_engine(url: str) -> Engine:
    """Build an engine for ``url`` with the settings each backend needs."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUnavailable(f"invalid database URL {url!r}: {exc}") from None
    kwargs: dict[str, Any] = {"future": True}
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 20
        if backend == "mysql":
            # Serializable-free, but row locks must see committed data.
            kwargs["isolation_level"] = "READ COMMITTED"
            kwargs["connect_args"] = {"charset": "utf8mb4"}
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        raise DatabaseUnavailable(f"no driver for database URL {parsed!r}: {exc}") from None
    if backend == "mysql":
        event.listen(engine, "handle_error", _mysql_check_is_integrity)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        # SQLite: take the write lock at BEGIN so concurrent writers serialize
        # instead of failing with "database is locked" on upgrade. Read-only
        # sessions (boot lookups) begin deferred and never wait for writers.
        event.listen(engine, "begin", _sqlite_begin)
        _queue_sqlite_writers(engine)

        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

    return engine


def get_engine(settings: Settings) -> Engine:
    """The process-wide engine for the configured URL (created once per URL)."""
    url = settings.effective_database_url
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_db_engine(url)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, and before a fork)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _current_engines.clear()


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that is closed afterwards; services commit themselves."""
    engine = get_engine(settings)
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
    except OperationalError as exc:
        session.rollback()
        raise DatabaseUnavailable(f"database error: {_short(exc)}") from None
    finally:
        session.close()


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", exc) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


# ---------------------------------------------------------------------------
# Migrations
# ---------------------------------------------------------------------------


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    config = _alembic_config(sa.create_engine("sqlite://"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {_short(exc)}") from None


@contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise schema changes between servers starting at the same time."""
    backend = engine.dialect.name
    if backend == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return
        import fcntl

        path = Path(database).with_name(Path(database).name + ".migrate.lock")
        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    try:
        connection = engine.connect()
    except OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {_short(exc)}") from None
    try:
        if backend == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_lock(7434573)")
        else:
            connection.exec_driver_sql("SELECT GET_LOCK('qrm_migrate', 600)")
        connection.commit()
        yield
    finally:
        try:
            if backend == "postgresql":
                connection.exec_driver_sql("SELECT pg_advisory_unlock(7434573)")
            else:
                connection.exec_driver_sql("SELECT RELEASE_LOCK('qrm_migrate')")
            connection.commit()
        finally:
            connection.close()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Create or upgrade the schema; returns (revision before, revision after)."""
    from alembic import command

    with migration_lock(engine):
        before = current_revision(engine)
        try:
            command.upgrade(_alembic_config(engine), revision)
        except OperationalError as exc:
            raise DatabaseUnavailable(f"cannot migrate the database: {_short(exc)}") from None
        return before, current_revision(engine) or ""


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    _current_engines.discard(engine)
    command.downgrade(_alembic_config(engine), revision)


_current_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def ensure_current(engine: Engine) -> None:
    """Refuse to work on a database that ``qrm init`` has not brought up to date.

    Checked once per engine and process: the schema only changes through
    ``qrm init``/``qrm server`` start-up, not under a running process.
    """
    if engine in _current_engines:
        return
    current = current_revision(engine)
    if current is None:
        raise NotInitialized("the database has no qrm schema; run 'qrm init' first")
    if current != head_revision():
        raise NotInitialized(
            f"the database schema is at {current}, this qrm needs {head_revision()}; "
            "run 'qrm init' to upgrade it"
        )
    _current_engines.add(engine)
