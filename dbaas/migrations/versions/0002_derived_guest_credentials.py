"""guest credentials derived from the service key: a generation per instance, no stored secrets

Revision ID: 0002
Revises: 0001

Guests created before this revision signed with stored random secrets, which stop
verifying here: their configs must be written anew (docs/adr/0004).
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('credential_generation', sa.Integer(), nullable=False,
                                      server_default='1'))
    op.drop_table('guest_credentials')


def downgrade() -> None:
    op.create_table('guest_credentials',
    sa.Column('instance_id', sa.String(length=36), nullable=False),
    sa.Column('secret', sa.String(length=128), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], ),
    sa.PrimaryKeyConstraint('instance_id')
    )
    # Not by rebuilding the table (batch mode's default on SQLite): dropping the old
    # instances table fails while backups refer to it with foreign keys enforced.
    # SQLite >= 3.35 drops the column in place.
    with op.batch_alter_table('instances', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('credential_generation')
