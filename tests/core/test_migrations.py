"""Alembic migrations build exactly the schema the models describe, on every backend."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from qrm_core import db


def test_schema_matches_models(qrm_db_url: str, qrm_backend: str) -> None:
    engine = db.create_db_engine(qrm_db_url)
    try:
        assert db.current_revision(engine) == db.head_revision()
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, SQLModel.metadata)
        assert diff == [], f"{qrm_backend}: migrations and models differ: {diff}"
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(qrm_db_url: str) -> None:
    engine = db.create_db_engine(qrm_db_url)
    try:
        db.downgrade(engine, "base")
        assert db.current_revision(engine) is None
        before, after = db.upgrade(engine)
        assert before is None and after == db.head_revision()
        before, after = db.upgrade(engine)
        assert before == after
    finally:
        engine.dispose()
