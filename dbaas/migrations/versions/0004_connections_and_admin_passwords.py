"""how clients connect, and the generation of each instance's administrator password

Revision ID: 0004
Revises: 0003

``connection`` is what the taskmanager records of where a client connects (JSON:
``{host, port, user, database}`` or ``{path}``); existing instances get it when their
guest is next started. ``password_generation`` numbers the administrator's password, which
is derived, never stored (docs/adr/0007).
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('connection', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('password_generation', sa.Integer(), nullable=False,
                                      server_default='1'))


def downgrade() -> None:
    # In place, not by rebuilding the table (see 0002): SQLite >= 3.35 drops columns.
    with op.batch_alter_table('instances', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('password_generation')
        batch_op.drop_column('connection')
