"""checks monitoring plugins run on a virtual environment's members, and failover on their word

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A JSON column cannot have a literal default on every backend: added
    # nullable, filled, then made NOT NULL.
    with op.batch_alter_table("virtual_environment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("monitor", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("monitor_failover", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute("UPDATE virtual_environment SET monitor = '[]'")
    with op.batch_alter_table("virtual_environment", schema=None) as batch_op:
        batch_op.alter_column("monitor", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("virtual_environment", schema=None) as batch_op:
        batch_op.drop_column("monitor_failover")
        batch_op.drop_column("monitor")
