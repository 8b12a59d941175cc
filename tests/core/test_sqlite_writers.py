"""SQLite writers of one process queue in Python, not in SQLite's busy handler (qrm_core.db._WriterQueue).

SQLite's busy handler sleeps and retries instead of waking when the write
lock is freed; with many request threads writing at once (registrations of a
rack) the lock sat free while they slept. These tests run with SQLite's busy
timeout at 0, so any writer that meets another one inside SQLite fails at
once with "database is locked": with the queue, writers of one process never
do. They also check that every way a transaction ends frees the queue.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlmodel import Session

from qrm_core.db import create_db_engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    made = create_db_engine(f"sqlite:///{tmp_path / 'w.db'}")

    @event.listens_for(made, "connect")
    def _no_busy_wait(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.execute("PRAGMA busy_timeout=0")

    with made.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    yield made
    made.dispose()


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one())


def test_writers_of_one_process_never_meet_in_sqlite(engine: sa.Engine) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(24)

    def write(n: int) -> None:
        start.wait()
        try:
            for i in range(25):
                with Session(engine) as session:
                    session.connection().exec_driver_sql("INSERT INTO t (n) VALUES (?)", (n * 100 + i,))
                    session.commit()
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert _count(engine) == 24 * 25


def test_every_end_of_a_transaction_frees_the_queue(engine: sa.Engine) -> None:
    queue = engine._qrm_writers  # type: ignore[attr-defined]
    # rollback
    with Session(engine) as session:
        session.connection().exec_driver_sql("INSERT INTO t (n) VALUES (1)")
        assert queue.lock.locked()
        session.rollback()
    assert not queue.lock.locked()
    # a session closed with its transaction open (the pool rolls it back)
    session = Session(engine)
    session.connection().exec_driver_sql("INSERT INTO t (n) VALUES (2)")
    session.close()
    assert not queue.lock.locked()
    # an error inside the transaction
    with pytest.raises(sa.exc.OperationalError), engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO no_such_table VALUES (1)")
    assert not queue.lock.locked()
    # begun in one thread, committed in another (FastAPI may end a dependency's
    # transaction in another thread of its pool)
    session = Session(engine)
    session.connection().exec_driver_sql("INSERT INTO t (n) VALUES (3)")
    other = threading.Thread(target=session.commit)
    other.start()
    other.join(10)
    session.close()
    assert not queue.lock.locked()
    # a connection invalidated in the middle of its transaction (a broken connection)
    conn = engine.connect()
    conn.exec_driver_sql("INSERT INTO t (n) VALUES (4)")
    assert queue.lock.locked()
    conn.invalidate()
    assert not queue.lock.locked()
    conn.close()
    # read-only transactions do not queue
    with engine.connect().execution_options(qrm_readonly=True) as conn:
        conn.exec_driver_sql("SELECT 1").all()
        assert not queue.lock.locked()
    assert _count(engine) == 1


def test_a_second_writer_in_the_same_thread_meets_sqlite_not_itself(engine: sa.Engine) -> None:
    """A write transaction opened inside another one in the same thread goes
    to SQLite (and is refused there, as without the queue) instead of waiting
    for a lock its own thread holds."""
    with Session(engine) as outer:
        outer.connection().exec_driver_sql("INSERT INTO t (n) VALUES (1)")
        with pytest.raises(sa.exc.OperationalError, match="locked"), Session(engine) as inner:
            inner.connection().exec_driver_sql("INSERT INTO t (n) VALUES (2)")
        outer.commit()
    assert not engine._qrm_writers.lock.locked()  # type: ignore[attr-defined]
    assert _count(engine) == 1
