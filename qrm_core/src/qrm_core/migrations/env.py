"""Alembic environment: runs against the engine qrm hands over (see qrm_core.db)."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from qrm_core import models  # noqa: F401  (registers the tables)

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    engine = config.attributes["engine"]
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("qrm migrations run online only ('qrm init')")
run_migrations_online()
