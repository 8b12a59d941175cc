"""partitions: the CPUs and memory each may grow to while running, as asked when it was added

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("partition", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_cpus", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_memory_mb", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("partition", schema=None) as batch_op:
        batch_op.drop_column("max_memory_mb")
        batch_op.drop_column("max_cpus")
