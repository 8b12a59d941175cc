"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import qrm_core.models

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('boot_image',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('kernel_version', sa.String(length=64), nullable=False),
    sa.Column('kernel_path', sa.String(length=512), nullable=True),
    sa.Column('initrd_path', sa.String(length=512), nullable=True),
    sa.Column('kernel_sha256', sa.String(length=64), nullable=True),
    sa.Column('initrd_sha256', sa.String(length=64), nullable=True),
    sa.Column('cmdline', sa.String(length=512), nullable=False),
    sa.Column('default_marker', sa.Integer(), nullable=True),
    sa.Column('comment', sa.String(length=255), nullable=False),
    sa.Column('created_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.CheckConstraint('default_marker IS NULL OR default_marker = 1', name=op.f('ck_boot_image_default_marker')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_boot_image')),
    sa.UniqueConstraint('default_marker', name=op.f('uq_boot_image_default_marker')),
    sa.UniqueConstraint('name', name=op.f('uq_boot_image_name'))
    )
    op.create_table('event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('time', qrm_core.models.UTCDateTime(), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('object_type', sa.String(length=32), nullable=False),
    sa.Column('object_name', sa.String(length=128), nullable=False),
    sa.Column('level', sa.String(length=16), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.CheckConstraint("level IN ('info', 'warning', 'error')", name=op.f('ck_event_level')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_event'))
    )
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_event_time'), ['time'], unique=False)

    op.create_table('plugin_setting',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('changed_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_plugin_setting'))
    )
    op.create_table('storage_server',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=False),
    sa.Column('comment', sa.String(length=255), nullable=False),
    sa.Column('created_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_storage_server')),
    sa.UniqueConstraint('name', name=op.f('uq_storage_server_name'))
    )
    op.create_table('user_account',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.CheckConstraint("role IN ('admin', 'operator', 'viewer')", name=op.f('ck_user_account_role')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_user_account')),
    sa.UniqueConstraint('name', name=op.f('uq_user_account_name'))
    )
    op.create_table('api_token',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('token_hash', sa.String(length=128), nullable=False),
    sa.Column('created_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.Column('last_used', qrm_core.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['user_account.id'], name=op.f('fk_api_token_user_id_user_account'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_token')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_token_token_hash'))
    )
    op.create_table('filesystem_image',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('storage_id', sa.Integer(), nullable=False),
    sa.Column('location', sa.String(length=255), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('size_mb', sa.Integer(), nullable=True),
    sa.Column('comment', sa.String(length=255), nullable=False),
    sa.Column('created_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.CheckConstraint("origin IN ('captured', 'imported', 'empty', 'auto')", name=op.f('ck_filesystem_image_origin')),
    sa.CheckConstraint("state IN ('ready', 'creating', 'error')", name=op.f('ck_filesystem_image_state')),
    sa.CheckConstraint('size_mb IS NULL OR size_mb >= 0', name=op.f('ck_filesystem_image_size')),
    sa.ForeignKeyConstraint(['storage_id'], ['storage_server.id'], name=op.f('fk_filesystem_image_storage_id_storage_server'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_filesystem_image')),
    sa.UniqueConstraint('name', name=op.f('uq_filesystem_image_name')),
    sa.UniqueConstraint('storage_id', 'location', name=op.f('uq_filesystem_image_storage_id_location'))
    )
    op.create_table('virtual_environment',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('boot_image_id', sa.Integer(), nullable=False),
    sa.Column('fs_image_id', sa.Integer(), nullable=False),
    sa.Column('deployment', sa.String(length=16), nullable=False),
    sa.Column('req_kind', sa.String(length=16), nullable=True),
    sa.Column('req_hypervisor', sa.String(length=32), nullable=True),
    sa.Column('req_cpus', sa.Integer(), nullable=False),
    sa.Column('req_memory_mb', sa.Integer(), nullable=False),
    sa.Column('pool_size', sa.Integer(), nullable=False),
    sa.Column('failover', sa.Boolean(), nullable=False),
    sa.Column('kernel_args', sa.String(length=512), nullable=False),
    sa.Column('desired_state', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('problem', sa.String(length=1024), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('comment', sa.String(length=255), nullable=False),
    sa.Column('created_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.Column('updated_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.CheckConstraint("deployment <> 'partitioned' OR req_hypervisor IS NOT NULL", name=op.f('ck_virtual_environment_partitioned_hypervisor')),
    sa.CheckConstraint("deployment = 'shared' OR pool_size = 1", name=op.f('ck_virtual_environment_pool_size_single')),
    sa.CheckConstraint("deployment IN ('single', 'shared', 'partitioned')", name=op.f('ck_virtual_environment_deployment')),
    sa.CheckConstraint("desired_state IN ('running', 'stopped')", name=op.f('ck_virtual_environment_desired_state')),
    sa.CheckConstraint("req_kind IS NULL OR req_kind IN ('physical', 'virtual')", name=op.f('ck_virtual_environment_req_kind')),
    sa.CheckConstraint("state IN ('stopped', 'starting', 'running', 'degraded', 'stopping')", name=op.f('ck_virtual_environment_state')),
    sa.CheckConstraint('pool_size >= 1', name=op.f('ck_virtual_environment_pool_size_positive')),
    sa.CheckConstraint('req_cpus >= 0 AND req_memory_mb >= 0', name=op.f('ck_virtual_environment_requirements')),
    sa.ForeignKeyConstraint(['boot_image_id'], ['boot_image.id'], name=op.f('fk_virtual_environment_boot_image_id_boot_image'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['fs_image_id'], ['filesystem_image.id'], name=op.f('fk_virtual_environment_fs_image_id_filesystem_image'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_virtual_environment')),
    sa.UniqueConstraint('name', name=op.f('uq_virtual_environment_name'))
    )
    op.create_table('resource',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mac', sa.String(length=17), nullable=False),
    sa.Column('ip', sa.String(length=45), nullable=True),
    sa.Column('hostname', sa.String(length=64), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('host_id', sa.Integer(), nullable=True),
    sa.Column('hypervisor', sa.String(length=32), nullable=True),
    sa.Column('capabilities', sa.JSON(), nullable=False),
    sa.Column('cpus', sa.Integer(), nullable=False),
    sa.Column('memory_mb', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('ve_id', sa.Integer(), nullable=True),
    sa.Column('boot_generation', sa.Integer(), nullable=False),
    sa.Column('load', sa.Float(), nullable=True),
    sa.Column('last_seen', qrm_core.models.UTCDateTime(), nullable=True),
    sa.Column('state_changed_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.Column('token_hash', sa.String(length=128), nullable=True),
    sa.Column('comment', sa.String(length=255), nullable=False),
    sa.Column('created_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.CheckConstraint("host_id IS NULL OR kind = 'virtual'", name=op.f('ck_resource_host_only_for_vms')),
    sa.CheckConstraint("kind IN ('physical', 'virtual')", name=op.f('ck_resource_kind')),
    sa.CheckConstraint("state IN ('new', 'idle', 'assigned', 'booting', 'active', 'error', 'off')", name=op.f('ck_resource_state')),
    sa.CheckConstraint("ve_id IS NOT NULL OR state NOT IN ('assigned', 'booting', 'active')", name=op.f('ck_resource_assigned_has_ve')),
    sa.CheckConstraint('cpus >= 0 AND memory_mb >= 0', name=op.f('ck_resource_size')),
    sa.ForeignKeyConstraint(['host_id'], ['resource.id'], name=op.f('fk_resource_host_id_resource'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['ve_id'], ['virtual_environment.id'], name=op.f('fk_resource_ve_id_virtual_environment'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_resource')),
    sa.UniqueConstraint('mac', name=op.f('uq_resource_mac'))
    )
    with op.batch_alter_table('resource', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_resource_ve_id'), ['ve_id'], unique=False)

    op.create_table('partition',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('host_id', sa.Integer(), nullable=False),
    sa.Column('hypervisor', sa.String(length=32), nullable=False),
    sa.Column('cpus', sa.Integer(), nullable=False),
    sa.Column('memory_mb', sa.Integer(), nullable=False),
    sa.Column('cpu_pinning', sa.String(length=255), nullable=False),
    sa.Column('mac', sa.String(length=17), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('resource_id', sa.Integer(), nullable=True),
    sa.Column('ve_id', sa.Integer(), nullable=True),
    sa.Column('created_at', qrm_core.models.UTCDateTime(), nullable=False),
    sa.CheckConstraint("state IN ('creating', 'stopped', 'running', 'paused', 'error')", name=op.f('ck_partition_state')),
    sa.CheckConstraint('cpus >= 1 AND memory_mb >= 1', name=op.f('ck_partition_size')),
    sa.ForeignKeyConstraint(['host_id'], ['resource.id'], name=op.f('fk_partition_host_id_resource'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['resource_id'], ['resource.id'], name=op.f('fk_partition_resource_id_resource'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['ve_id'], ['virtual_environment.id'], name=op.f('fk_partition_ve_id_virtual_environment'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_partition')),
    sa.UniqueConstraint('host_id', 'name', name=op.f('uq_partition_host_id_name')),
    sa.UniqueConstraint('mac', name=op.f('uq_partition_mac')),
    sa.UniqueConstraint('resource_id', name=op.f('uq_partition_resource_id'))
    )


def downgrade() -> None:
    # Dropping a table drops its indexes (MySQL refuses to drop an index a
    # foreign key needs, so they are not dropped one by one).
    for table in (
        "partition", "resource", "virtual_environment", "filesystem_image", "api_token",
        "user_account", "storage_server", "plugin_setting", "event", "boot_image",
    ):
        op.drop_table(table)
