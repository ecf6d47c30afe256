"""initial schema

Revision ID: 0001
Revises: 
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('instances',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('datastore', sa.String(length=32), nullable=False),
    sa.Column('datastore_version', sa.String(length=32), nullable=True),
    sa.Column('task_status', sa.String(length=32), nullable=False),
    sa.Column('service_status', sa.String(length=32), nullable=True),
    sa.Column('service_status_updated', sa.DateTime(), nullable=True),
    sa.Column('guest_agent_version', sa.String(length=64), nullable=True),
    sa.Column('last_heartbeat', sa.DateTime(), nullable=True),
    sa.Column('fault_kind', sa.String(length=32), nullable=True),
    sa.Column('fault_message', sa.Text(), nullable=True),
    sa.Column('fault_at', sa.DateTime(), nullable=True),
    sa.Column('host', sa.String(length=255), nullable=True),
    sa.Column('port', sa.Integer(), nullable=True),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('updated', sa.DateTime(), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('deleted_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index('ix_instances_last_heartbeat', ['last_heartbeat'], unique=False)
        batch_op.create_index('ix_instances_task_status_created', ['task_status', 'created'], unique=False)

    op.create_table('watermarks',
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('key', sa.String(length=36), nullable=False),
    sa.Column('sent', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'key')
    )
    op.create_table('backups',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('instance_id', sa.String(length=36), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('size', sa.Float(), nullable=True),
    sa.Column('checksum', sa.String(length=128), nullable=True),
    sa.Column('location', sa.String(length=1024), nullable=True),
    sa.Column('backup_type', sa.String(length=64), nullable=True),
    sa.Column('parent_id', sa.String(length=36), nullable=True),
    sa.Column('fail_reason', sa.Text(), nullable=True),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('updated', sa.DateTime(), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('deleted_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_backups_instance_id'), ['instance_id'], unique=False)
        batch_op.create_index('ix_backups_state_created', ['state', 'created'], unique=False)

    op.create_table('guest_credentials',
    sa.Column('instance_id', sa.String(length=36), nullable=False),
    sa.Column('secret', sa.String(length=128), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], ),
    sa.PrimaryKeyConstraint('instance_id')
    )


def downgrade() -> None:
    op.drop_table('guest_credentials')
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.drop_index('ix_backups_state_created')
        batch_op.drop_index(batch_op.f('ix_backups_instance_id'))

    op.drop_table('backups')
    op.drop_table('watermarks')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_task_status_created')
        batch_op.drop_index('ix_instances_last_heartbeat')

    op.drop_table('instances')
