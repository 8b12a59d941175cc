"""The reference for ``bench_register.py``: the same stack as ``qrm server``
(uvicorn, FastAPI, pydantic, synchronous endpoints in the thread pool,
SQLite in WAL mode) with the least work an agent endpoint can do: one
INSERT per registration, one UPDATE per heartbeat.

Its rate is the ceiling of the stack on this machine; qrm's rate is reported
as a fraction of it. Served with the same ``uvicorn.Config`` options as
:meth:`qrm_core.server.QrmServer.build` and a socket bound the same way.

    python bench/server/bare_app.py --port 8099 --db /tmp/bare.db
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import secrets
import sqlite3
import threading
from datetime import UTC, datetime
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

SCHEMA = """
CREATE TABLE IF NOT EXISTS resource (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mac VARCHAR(17) NOT NULL UNIQUE,
    ip VARCHAR(64),
    cpus INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    state VARCHAR(16) NOT NULL,
    token_hash VARCHAR(64) NOT NULL,
    boot_generation INTEGER NOT NULL,
    load FLOAT,
    last_seen DATETIME
)
"""


class RegisterRequest(BaseModel):
    mac: str = Field(max_length=32)
    ip: str | None = Field(default=None, max_length=64)
    cpus: int = Field(ge=0, le=4096)
    memory_mb: int = Field(ge=0, le=64 * 1024 * 1024)
    hostname: str | None = Field(default=None, max_length=64)
    hypervisors: list[str] = Field(default_factory=list, max_length=16)
    boot_generation: int = Field(default=0, ge=0)
    mode: Literal["idle", "ve"] = "idle"
    ve: str | None = Field(default=None, max_length=64)


class RegisterResponse(BaseModel):
    resource_id: int
    token: str
    heartbeat_interval: float
    state: str
    boot_generation: int


class HeartbeatRequest(BaseModel):
    resource_id: int
    state: Literal["idle", "active"]
    load: float | None = Field(default=None, ge=0, le=1e6)
    boot_generation: int = Field(default=0, ge=0)


class HeartbeatResponse(BaseModel):
    command: Literal["none", "reboot", "halt"]
    heartbeat_interval: float
    boot_generation: int


def create_app(path: str, enrollment_token: str) -> FastAPI:
    local = threading.local()

    def connection() -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            local.conn = conn
        return conn

    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(SCHEMA)

    app = FastAPI()

    def bearer(authorization: str | None) -> str:
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise HTTPException(401, "missing token")
        return value.strip()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/agent/v1/register")
    def register(
        body: RegisterRequest, authorization: Annotated[str | None, Header()] = None
    ) -> RegisterResponse:
        if not hmac.compare_digest(bearer(authorization).encode(), enrollment_token.encode()):
            raise HTTPException(401, "wrong enrollment token")
        token = secrets.token_urlsafe(32)
        row = (
            connection()
            .execute(
                "INSERT INTO resource (mac, ip, cpus, memory_mb, state, token_hash, boot_generation, last_seen)"
                " VALUES (?, ?, ?, ?, 'idle', ?, ?, ?) RETURNING id",
                (
                    body.mac.lower(),
                    body.ip,
                    body.cpus,
                    body.memory_mb,
                    hashlib.sha256(token.encode()).hexdigest(),
                    body.boot_generation,
                    datetime.now(UTC).replace(tzinfo=None),
                ),
            )
            .fetchone()
        )
        return RegisterResponse(
            resource_id=row[0],
            token=token,
            heartbeat_interval=10.0,
            state="idle",
            boot_generation=body.boot_generation,
        )

    @app.post("/agent/v1/heartbeat")
    def heartbeat(
        body: HeartbeatRequest, authorization: Annotated[str | None, Header()] = None
    ) -> HeartbeatResponse:
        token_hash = hashlib.sha256(bearer(authorization).encode()).hexdigest()
        cursor = connection().execute(
            "UPDATE resource SET last_seen = ?, load = ? WHERE id = ? AND token_hash = ?",
            (datetime.now(UTC).replace(tzinfo=None), body.load, body.resource_id, token_hash),
        )
        if cursor.rowcount != 1:
            raise HTTPException(401, "unknown resource or wrong token")
        return HeartbeatResponse(
            command="none", heartbeat_interval=10.0, boot_generation=body.boot_generation
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True, help="SQLite file")
    parser.add_argument("--enroll", default="bench-enrollment-token")
    args = parser.parse_args()
    from qrm_core.server import bind_socket

    sock = bind_socket("127.0.0.1", args.port)
    # The options of QrmServer.build, so both servers run the same way.
    config = uvicorn.Config(
        create_app(args.db, args.enroll),
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        backlog=4096,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
