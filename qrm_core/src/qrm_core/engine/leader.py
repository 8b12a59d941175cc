"""Leadership: exactly one qrm server of a site runs the reconciler.

The lock lives where the data lives and dies with its holder:

* PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a
  connection kept for the purpose;
* MariaDB/MySQL: a named lock (``GET_LOCK``) on such a connection;
* SQLite: an exclusive ``flock`` on a file beside the database (SQLite is one
  machine; every server on it shares the file).

If the holder dies (or its connection does), the database releases the lock
and another server's next attempt takes it. A holder checks its connection
on every pass, so a server whose database connection broke stops reconciling
at once rather than racing the new leader.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

log = logging.getLogger("qrm.engine")

LOCK_NAME = "qrm_reconciler"
PG_LOCK_KEY = 0x71726D  # "qrm"


class LeaderLock:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.backend = engine.dialect.name
        self._connection: sa.Connection | None = None
        self._file: IO[Any] | None = None

    @property
    def held(self) -> bool:
        return self._connection is not None or self._file is not None

    def try_acquire(self) -> bool:
        """Take the lock if free; True if this process holds it (now or already)."""
        if self.held:
            return self.check()
        if self.backend == "sqlite":
            return self._acquire_file()
        try:
            connection = self.engine.connect()
        except sa.exc.OperationalError as exc:
            log.warning("leader lock: cannot connect: %s", exc)
            return False
        try:
            if self.backend == "postgresql":
                got = connection.execute(
                    sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": PG_LOCK_KEY}
                ).scalar()
            else:
                got = connection.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": LOCK_NAME}).scalar()
            connection.commit()
        except sa.exc.DBAPIError as exc:
            log.warning("leader lock: %s", exc)
            connection.close()
            return False
        if got:
            self._connection = connection
            log.info("leader lock acquired (%s)", self.backend)
            return True
        connection.close()
        return False

    def _acquire_file(self) -> bool:
        database = self.engine.url.database
        if not database or database == ":memory:":
            self._file = open(os.devnull)  # one process, one database: always the leader
            return True
        path = Path(database).with_name(Path(database).name + ".reconciler.lock")
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._file = handle
        log.info("leader lock acquired (%s)", path)
        return True

    def check(self) -> bool:
        """Still the leader? (The connection holding the lock is alive.)"""
        if self._file is not None:
            return True
        if self._connection is None:
            return False
        try:
            self._connection.execute(sa.text("SELECT 1")).scalar()
            self._connection.commit()
            return True
        except sa.exc.DBAPIError:
            log.warning("leader lock lost: the database connection broke")
            self._drop()
            return False

    def release(self) -> None:
        if self._file is not None:
            try:
                fcntl.flock(self._file, fcntl.LOCK_UN)
            except OSError:
                pass
            self._file.close()
            self._file = None
            return
        if self._connection is not None:
            try:
                if self.backend == "postgresql":
                    self._connection.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
                else:
                    self._connection.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": LOCK_NAME})
                self._connection.commit()
            except sa.exc.DBAPIError:
                pass
            self._drop()

    def _drop(self) -> None:
        if self._connection is not None:
            try:
                self._connection.invalidate()
                self._connection.close()
            except Exception:  # noqa: BLE001
                pass
            self._connection = None
