"""engine state: site settings, pending commands, heartbeat timeouts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import qrm_core.models

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('site_setting',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.Column('changed_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_site_setting'))
    )
    with op.batch_alter_table('resource', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pending_command', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_timeout', sa.Float(), nullable=True))
        batch_op.create_index(batch_op.f('ix_resource_last_seen'), ['last_seen'], unique=False)
        batch_op.create_index(batch_op.f('ix_resource_state'), ['state'], unique=False)
        batch_op.create_check_constraint(
            op.f('ck_resource_pending_command'), "pending_command IS NULL OR pending_command IN ('halt')"
        )
        batch_op.create_check_constraint(
            op.f('ck_resource_heartbeat_timeout'), "heartbeat_timeout IS NULL OR heartbeat_timeout > 0"
        )


def downgrade() -> None:
    with op.batch_alter_table('resource', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_resource_heartbeat_timeout'), type_='check')
        batch_op.drop_constraint(op.f('ck_resource_pending_command'), type_='check')
        batch_op.drop_index(batch_op.f('ix_resource_state'))
        batch_op.drop_index(batch_op.f('ix_resource_last_seen'))
        batch_op.drop_column('heartbeat_timeout')
        batch_op.drop_column('pending_command')

    op.drop_table('site_setting')
