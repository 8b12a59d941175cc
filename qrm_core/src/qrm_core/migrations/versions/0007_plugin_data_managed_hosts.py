"""plugin data (plugins' own records) and managed hosts (resources without an agent)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import qrm_core.models

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plugin_data",
        sa.Column("plugin", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("changed_at", qrm_core.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("plugin", "key", name=op.f("pk_plugin_data")),
    )
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.add_column(sa.Column("managed_by", sa.String(length=96), nullable=True))
        batch_op.add_column(sa.Column("free_memory_mb", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_resource_managed_by"), ["managed_by"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_resource_managed_by"))
        batch_op.drop_column("free_memory_mb")
        batch_op.drop_column("managed_by")
    op.drop_table("plugin_data")
