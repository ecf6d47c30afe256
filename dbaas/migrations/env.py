"""Alembic environment: migrates whatever database ``DBAAS_DATABASE_URL`` names."""

from alembic import context

from dbaas import db
from dbaas.models import Base


def run_migrations() -> None:
    connectable = context.config.attributes.get("connection")
    if connectable is None:
        with db.engine().connect() as connection:
            _migrate(connection)
    else:
        _migrate(connectable)


def _migrate(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
