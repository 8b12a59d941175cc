"""remember the boot generation of each resource's last registration (boot timeout)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.add_column(sa.Column("booted_generation", sa.Integer(), nullable=False, server_default="0"))
    # Existing resources: their last registration was of their current generation.
    op.execute("UPDATE resource SET booted_generation = boot_generation")


def downgrade() -> None:
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.drop_column("booted_generation")
