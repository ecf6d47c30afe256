"""Alembic migrations (dbaas.migrations) on empty SQLite and PostgreSQL databases."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from dbaas import db, migrations
from dbaas.models import Base
from tests.support.stack import configure

TABLES = {"instances", "backups", "watermarks", "guest_credentials"}


@pytest.fixture
def empty_database(monkeypatch, tmp_path, database_url):
    """This process pointed at an empty database (nothing migrated yet)."""
    configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=database_url,
              DBAAS_SERVICE_KEY="test-service-key")
    yield db.engine()
    db.engine().dispose()


def schema(engine) -> dict:
    """Every table with its columns (name, type, nullability) and indexes."""
    inspector = inspect(engine)
    return {
        table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            "indexes": sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)),
            "foreign_keys": sorted((tuple(f["constrained_columns"]), f["referred_table"])
                                   for f in inspector.get_foreign_keys(table)),
        }
        for table in sorted(inspector.get_table_names())
    }


def revision(engine) -> list:
    with engine.connect() as connection:
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()


def differences(engine) -> list:
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_upgrade_creates_the_tables(empty_database):
    assert inspect(empty_database).get_table_names() == []
    migrations.upgrade()
    tables = schema(empty_database)
    assert set(tables) == TABLES | {"alembic_version"}
    assert revision(empty_database) == ["0001"]
    assert ("ix_instances_last_heartbeat", ("last_heartbeat",)) in tables["instances"]["indexes"]
    assert ("ix_backups_state_created", ("state", "created")) in tables["backups"]["indexes"]
    assert (("instance_id",), "instances") in tables["backups"]["foreign_keys"]


def test_second_upgrade_is_a_no_op(empty_database):
    migrations.upgrade()
    with empty_database.begin() as connection:
        connection.execute(text(
            "INSERT INTO watermarks (kind, key, sent) VALUES ('heartbeat', 'k', 1.5)"))
    before = schema(empty_database)
    migrations.upgrade()
    assert schema(empty_database) == before
    assert revision(empty_database) == ["0001"]
    with empty_database.connect() as connection:
        assert connection.execute(text("SELECT kind, key, sent FROM watermarks")).all() == [("heartbeat", "k", 1.5)]


def test_models_and_migrations_agree(empty_database):
    migrations.upgrade()
    assert differences(empty_database) == []


def test_downgrade_to_base_and_back(empty_database):
    migrations.upgrade()
    migrated = schema(empty_database)
    command.downgrade(migrations.alembic_config(), "base")
    assert set(inspect(empty_database).get_table_names()) == {"alembic_version"}
    migrations.upgrade()
    assert schema(empty_database) == migrated
