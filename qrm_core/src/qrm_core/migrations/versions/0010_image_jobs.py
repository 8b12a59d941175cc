"""filesystem images: where their data came from and when, a running job's progress; VEs kept pristine

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from qrm_core.models import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("filesystem_image", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source", sa.String(length=255), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("source_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("progress", sa.String(length=255), nullable=False, server_default=""))
    with op.batch_alter_table("virtual_environment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pristine", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("virtual_environment", schema=None) as batch_op:
        batch_op.drop_column("pristine")
    with op.batch_alter_table("filesystem_image", schema=None) as batch_op:
        batch_op.drop_column("progress")
        batch_op.drop_column("source_at")
        batch_op.drop_column("source")
