"""heartbeats update instances in place: no index on last_heartbeat, room on each page

Revision ID: 0005
Revises: 0004

Every heartbeat writes ``last_heartbeat``. While it was indexed, each write added an entry
to every index of ``instances`` (PostgreSQL can update a row within its page, without
touching indexes, only when no indexed column changes). The timeout sweep, the only
reader that filtered on it, scans the table once per sweep instead. On PostgreSQL the
table also leaves a fifth of each page free, so that the new row version fits beside the
old one (this applies to pages written from now on).
"""

from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_instances_last_heartbeat', table_name='instances')
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE instances SET (fillfactor = 80)')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE instances RESET (fillfactor)')
    op.create_index('ix_instances_last_heartbeat', 'instances', ['last_heartbeat'], unique=False)
