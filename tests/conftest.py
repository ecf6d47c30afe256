import sys

import pytest

import dbaas.broker
from dbaas import db, migrations
from tests.support.services import (AMQP_ADMIN_URL, AMQP_HOST, PostgresDatabase, RabbitVhost, check_port,
                                    project_env, unavailable)
from tests.support.stack import SERVICE_KEY, SLEEP, Running, Stack, configure


def pytest_configure(config):
    config.addinivalue_line("markers", "fault: restarts or kills servers and workers (slow; CI runs them)")
    config.addinivalue_line("markers", "fuzz: schemathesis against the live REST API (bounded: fixed "
                            "examples per operation and seed; CI runs it)")


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
                       DBAAS_DATABASE_URL=database_url, DBAAS_SERVICE_KEY=SERVICE_KEY)
    migrations.upgrade()
    yield config
    db.engine().dispose()


@pytest.fixture
def env_for(tmp_path):
    """Environment for child processes (workers, CLI) of one test."""
    def build(database_url: str, broker_url: str, **extra) -> dict:
        if broker_url.startswith("amqp"):
            extra.setdefault("DBAAS_BROKER_ADMIN_URL", AMQP_ADMIN_URL)
        return project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=database_url,
                           DBAAS_BROKER_URL=broker_url, DBAAS_SERVICE_KEY=SERVICE_KEY, **extra)
    return build


@pytest.fixture(params=["rabbitmq-postgresql", "embedded"])
def stack(request, monkeypatch, tmp_path, env_for):
    if request.param == "embedded":
        database_url = f"sqlite:///{tmp_path / 'control.sqlite3'}"
        broker_url = dbaas.broker.broker_url_for(str(tmp_path / "broker"))
        postgres = None
    else:
        postgres = request.getfixturevalue("postgres")
        database_url, broker_url = postgres.url, request.getfixturevalue("rabbit").url
    env = env_for(database_url, broker_url)
    configure(monkeypatch, **{k: v for k, v in env.items() if k.startswith("DBAAS_")})
    migrations.upgrade()
    yield Stack(request.param, database_url, broker_url, env, tmp_path, postgres)
    db.engine().dispose()


@pytest.fixture
def start(stack):
    """start(guest_command) -> a Running system (conductor + taskmanager); stopped, and its
    guests ended, afterwards. ``None`` runs the real guest agent."""
    started = []

    def start_with(guest_command: list[str] | None) -> Running:
        started.append(Running(stack, guest_command))
        return started[-1].start()
    yield start_with
    for system in started:
        system.stop()


@pytest.fixture
def running(start) -> Running:
    """With a placeholder guest that runs and does nothing."""
    return start([sys.executable, "-c", SLEEP])
