"""Alembic migrations (dbaas.migrations) on empty SQLite and PostgreSQL databases."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from dbaas import db, migrations
from dbaas.models import Base
from tests.support.stack import configure

TABLES_0002 = {"instances", "backups", "watermarks"}
TABLES = TABLES_0002 | {"projects"}
HEAD = "0005"


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
    assert revision(empty_database) == [HEAD]
    assert ("credential_generation", "INTEGER", False) in tables["instances"]["columns"]
    assert not any(columns == ("last_heartbeat",) for _, columns in tables["instances"]["indexes"])
    assert ("ix_backups_state_created", ("state", "created")) in tables["backups"]["indexes"]
    assert ("ix_instances_tenant_id_created", ("tenant_id", "created", "id")) in tables["instances"]["indexes"]
    assert (("instance_id",), "instances") in tables["backups"]["foreign_keys"]


def test_second_upgrade_is_a_no_op(empty_database):
    migrations.upgrade()
    with empty_database.begin() as connection:
        connection.execute(text(
            "INSERT INTO watermarks (kind, key, sent) VALUES ('heartbeat', 'k', 1.5)"))
    before = schema(empty_database)
    migrations.upgrade()
    assert schema(empty_database) == before
    assert revision(empty_database) == [HEAD]
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


# --- 0001 -> 0002: guest credentials derived instead of stored ------------------------------

INSTANCE = "11111111-1111-1111-1111-111111111111"
BACKUP = "22222222-2222-2222-2222-222222222222"


def rows(engine, query: str) -> list:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(query))]


def fill_0001(engine) -> None:
    """What a database in use at revision 0001 holds: an instance with a stored guest
    secret and a backup of it."""
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO instances (id, name, tenant_id, datastore, task_status, created, updated, deleted) "
            "VALUES (:id, 'db', 'p1', 'sqlite', 'NONE', '2030-01-01 00:00:00', '2030-01-01 00:00:00', :false)"),
            {"id": INSTANCE, "false": False})
        connection.execute(text(
            "INSERT INTO backups (id, instance_id, tenant_id, name, state, created, updated, deleted) "
            "VALUES (:id, :instance, 'p1', 'nightly', 'COMPLETED', '2030-01-01 00:00:00', "
            "'2030-01-01 00:00:00', :false)"), {"id": BACKUP, "instance": INSTANCE, "false": False})
        connection.execute(text(
            "INSERT INTO guest_credentials (instance_id, secret, created) "
            "VALUES (:id, :secret, '2030-01-01 00:00:00')"), {"id": INSTANCE, "secret": "s" * 64})


def test_0001_to_0002_upgrade_and_downgrade_keep_the_data(empty_database):
    migrations.upgrade("0001")
    assert revision(empty_database) == ["0001"]
    at_0001 = schema(empty_database)
    assert "guest_credentials" in at_0001
    assert "credential_generation" not in [c[0] for c in at_0001["instances"]["columns"]]
    fill_0001(empty_database)

    migrations.upgrade("0002")
    assert revision(empty_database) == ["0002"]
    upgraded = schema(empty_database)
    assert set(upgraded) == TABLES_0002 | {"alembic_version"}  # stored secrets are gone
    assert ("credential_generation", "INTEGER", False) in upgraded["instances"]["columns"]
    # Existing instances start at generation 1; nothing else of theirs changes.
    assert rows(empty_database, "SELECT id, name, tenant_id, credential_generation FROM instances") == [
        (INSTANCE, "db", "p1", 1)]
    assert rows(empty_database, "SELECT id, instance_id, state FROM backups") == [
        (BACKUP, INSTANCE, "COMPLETED")]

    command.downgrade(migrations.alembic_config(), "0001")
    assert revision(empty_database) == ["0001"]
    assert schema(empty_database) == at_0001
    assert rows(empty_database, "SELECT id, name, tenant_id FROM instances") == [(INSTANCE, "db", "p1")]
    assert rows(empty_database, "SELECT id, instance_id, state FROM backups") == [
        (BACKUP, INSTANCE, "COMPLETED")]
    # The secrets were never kept: a downgraded guest needs its config written anew.
    assert rows(empty_database, "SELECT * FROM guest_credentials") == []

    migrations.upgrade("0002")
    assert schema(empty_database) == upgraded
    assert rows(empty_database, "SELECT id, credential_generation FROM instances") == [(INSTANCE, 1)]


# --- 0002 -> 0003: projects and quotas, flavor and volume, backups' datastore -------------

def test_0002_to_0003_upgrade_and_downgrade_keep_the_data(empty_database):
    migrations.upgrade("0001")
    fill_0001(empty_database)
    migrations.upgrade("0002")
    at_0002 = schema(empty_database)
    before = rows(empty_database, "SELECT id, name, tenant_id, datastore, task_status FROM instances")

    migrations.upgrade("0003")
    assert revision(empty_database) == ["0003"]
    upgraded = schema(empty_database)
    assert set(upgraded) == TABLES | {"alembic_version"}
    assert [c[0] for c in upgraded["projects"]["columns"]] == ["id", "max_instances", "max_backups", "created"]
    for column in ("flavor_id", "volume_size"):
        assert column in [c[0] for c in upgraded["instances"]["columns"]]
    assert ("ix_backups_tenant_id_created", ("tenant_id", "created", "id")) in upgraded["backups"]["indexes"]
    # The instance gets its datastore's version; its backup the instance's datastore.
    assert rows(empty_database, "SELECT id, name, tenant_id, datastore, task_status FROM instances") == before
    assert rows(empty_database, "SELECT datastore_version, flavor_id, volume_size FROM instances") == [
        ("3", None, None)]
    assert rows(empty_database, "SELECT id, datastore, datastore_version, state FROM backups") == [
        (BACKUP, "sqlite", "3", "COMPLETED")]
    assert rows(empty_database, "SELECT * FROM projects") == []
    with empty_database.begin() as connection:
        connection.execute(text("INSERT INTO projects (id, max_instances, created) "
                                "VALUES ('p1', 3, '2030-01-01 00:00:00')"))

    command.downgrade(migrations.alembic_config(), "0002")
    assert revision(empty_database) == ["0002"]
    assert schema(empty_database) == at_0002
    assert rows(empty_database, "SELECT id, name, tenant_id, datastore, task_status FROM instances") == before
    assert rows(empty_database, "SELECT id, instance_id, state FROM backups") == [
        (BACKUP, INSTANCE, "COMPLETED")]

    migrations.upgrade("0003")
    assert schema(empty_database) == upgraded


# --- 0003 -> 0004: connections, administrator password generations ------------------------

def test_0003_to_0004_upgrade_and_downgrade_keep_the_data(empty_database):
    migrations.upgrade("0001")
    fill_0001(empty_database)
    migrations.upgrade("0003")
    at_0003 = schema(empty_database)
    before = rows(empty_database, "SELECT id, name, tenant_id, datastore, task_status, host, port FROM instances")

    migrations.upgrade("0004")
    assert rows(empty_database, "SELECT connection, password_generation FROM instances") == [(None, 1)]
    assert rows(empty_database, "SELECT id, name, tenant_id, datastore, task_status, host, port "
                                "FROM instances") == before
    # What 0005 changes, and nothing else, is left between 0004 and the models.
    assert [(change, index.name) for change, index in differences(empty_database)] == [
        ("remove_index", "ix_instances_last_heartbeat")]

    command.downgrade(migrations.alembic_config(), "0003")
    assert schema(empty_database) == at_0003
    assert rows(empty_database, "SELECT id, name, tenant_id, datastore, task_status, host, port "
                                "FROM instances") == before


# --- 0004 -> 0005: heartbeats update instances in place --------------------------------------

def fillfactor(engine) -> list:
    if engine.dialect.name != "postgresql":
        return []
    return rows(engine, "SELECT reloptions FROM pg_class WHERE relname = 'instances'")


def test_0004_to_0005_drops_the_heartbeat_index_and_keeps_the_data(empty_database):
    migrations.upgrade("0001")
    fill_0001(empty_database)
    migrations.upgrade("0004")
    at_0004 = schema(empty_database)
    query = "SELECT id, name, task_status, last_heartbeat, credential_generation FROM instances"
    before = rows(empty_database, query)

    migrations.upgrade("0005")
    assert rows(empty_database, query) == before
    assert "ix_instances_last_heartbeat" not in {name for name, _ in schema(empty_database)["instances"]["indexes"]}
    assert differences(empty_database) == []
    if empty_database.dialect.name == "postgresql":
        assert fillfactor(empty_database) == [(["fillfactor=80"],)]

    command.downgrade(migrations.alembic_config(), "0004")
    assert schema(empty_database) == at_0004
    assert rows(empty_database, query) == before
    assert fillfactor(empty_database) in ([], [(None,)])
