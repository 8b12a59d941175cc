"""hypervisor hosts and power controllers: how qrm reaches them; storage server settings; paused resources

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

OLD_STATES = "state IN ('new', 'idle', 'assigned', 'booting', 'active', 'error', 'off')"
NEW_STATES = "state IN ('new', 'idle', 'assigned', 'booting', 'active', 'paused', 'error', 'off')"


def upgrade() -> None:
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hypervisor_uri", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("network", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("host_settings", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("power_driver", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("power_address", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("power_username", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("power_password", sa.String(length=255), nullable=True))
        batch_op.drop_constraint(op.f("ck_resource_state"), type_="check")
        batch_op.create_check_constraint("state", NEW_STATES)
    with op.batch_alter_table("storage_server", schema=None) as batch_op:
        batch_op.add_column(sa.Column("settings", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE resource SET state = 'active' WHERE state = 'paused' AND ve_id IS NOT NULL")
    op.execute("UPDATE resource SET state = 'idle' WHERE state = 'paused'")
    with op.batch_alter_table("storage_server", schema=None) as batch_op:
        batch_op.drop_column("settings")
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_resource_state"), type_="check")
        batch_op.create_check_constraint("state", OLD_STATES)
        batch_op.drop_column("power_password")
        batch_op.drop_column("power_username")
        batch_op.drop_column("power_address")
        batch_op.drop_column("power_driver")
        batch_op.drop_column("host_settings")
        batch_op.drop_column("network")
        batch_op.drop_column("hypervisor_uri")
