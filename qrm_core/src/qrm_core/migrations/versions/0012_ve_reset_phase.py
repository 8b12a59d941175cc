"""virtual environments: where a reset of a running VE is (its machines hold their boot meanwhile)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("virtual_environment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reset_phase", sa.String(length=16), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("virtual_environment", schema=None) as batch_op:
        batch_op.drop_column("reset_phase")
