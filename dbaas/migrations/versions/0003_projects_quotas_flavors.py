"""the REST API's tenants: projects with quota overrides, flavor and volume size per instance,
the datastore of each backup, indexes for a project's pages

Revision ID: 0003
Revises: 0002

Existing instances get their datastore's only version (none was recorded before) and
existing backups their instance's datastore; flavor and volume size stay unknown (NULL).
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# The versions each datastore had when this revision was written (workers/guestagent/api.py).
VERSIONS = {'sqlite': '3', 'postgresql': '15'}


def upgrade() -> None:
    op.create_table('projects',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('max_instances', sa.Integer(), nullable=True),
    sa.Column('max_backups', sa.Integer(), nullable=True),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('flavor_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('volume_size', sa.Integer(), nullable=True))
        batch_op.create_index('ix_instances_tenant_id_created', ['tenant_id', 'created', 'id'], unique=False)
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.add_column(sa.Column('datastore', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('datastore_version', sa.String(length=32), nullable=True))
        batch_op.create_index('ix_backups_tenant_id_created', ['tenant_id', 'created', 'id'], unique=False)
    for datastore, version in VERSIONS.items():
        op.execute(sa.text("UPDATE instances SET datastore_version = :version "
                           "WHERE datastore = :datastore AND datastore_version IS NULL")
                   .bindparams(datastore=datastore, version=version))
    op.execute("UPDATE backups SET "
               "datastore = (SELECT datastore FROM instances WHERE instances.id = backups.instance_id), "
               "datastore_version = (SELECT datastore_version FROM instances "
               "WHERE instances.id = backups.instance_id)")


def downgrade() -> None:
    # In place, not by rebuilding the tables (see 0002): SQLite >= 3.35 drops columns.
    with op.batch_alter_table('backups', schema=None, recreate='never') as batch_op:
        batch_op.drop_index('ix_backups_tenant_id_created')
        batch_op.drop_column('datastore_version')
        batch_op.drop_column('datastore')
    with op.batch_alter_table('instances', schema=None, recreate='never') as batch_op:
        batch_op.drop_index('ix_instances_tenant_id_created')
        batch_op.drop_column('volume_size')
        batch_op.drop_column('flavor_id')
    op.drop_table('projects')
