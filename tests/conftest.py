import pytest

from dbaas import db, migrations, settings
from tests.services import (AMQP_HOST, PostgresDatabase, RabbitVhost, check_port, project_env,
                            unavailable)
from workers.conductor import auth


def configure(monkeypatch, **env) -> settings.Settings:
    """Point this process's settings (and its engine) at the given DBAAS_* values."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(settings, "_current", None)
    monkeypatch.setattr(db, "_engine", None)
    monkeypatch.setattr(auth, "_cache", None)
    return settings.get()


@pytest.fixture
def postgres():
    database = PostgresDatabase()
    try:
        database.create()
    except Exception as exc:  # any connection failure
        unavailable("PostgreSQL", exc)
    yield database
    if db._engine is not None:
        db._engine.dispose()
    database.drop()


@pytest.fixture
def rabbit():
    check_port(AMQP_HOST, "RabbitMQ")
    vhost = RabbitVhost().create()
    yield vhost
    vhost.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'control.sqlite3'}"
    return request.getfixturevalue("postgres").url


@pytest.fixture
def control_plane(monkeypatch, tmp_path, database_url):
    """This process configured as the control plane on a migrated database."""
    config = configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"),
                       DBAAS_DATABASE_URL=database_url, DBAAS_SERVICE_KEY="test-service-key")
    migrations.upgrade()
    yield config
    db.engine().dispose()


@pytest.fixture
def env_for(tmp_path):
    """Environment for child processes (workers, CLI) of one test."""
    def build(database_url: str, broker_url: str, **extra) -> dict:
        return project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=database_url,
                           DBAAS_BROKER_URL=broker_url, DBAAS_SERVICE_KEY="test-service-key",
                           **extra)
    return build
