"""Fault tests: private RabbitMQ nodes and PostgreSQL clusters started here, never the
shared ones. A node and a PostgreSQL server are shared by the tests of this package that
neither stop nor restart them (each test gets a vhost and a database of its own); a test
that restarts or kills a server starts its own. Everything is removed afterwards, also
after a failure."""

import uuid

import pytest

from tests.support.faults import System, Vhost
from tests.support.private_postgres import PostgresServer
from tests.support.private_rabbit import RabbitNode


@pytest.fixture(scope="package")
def rabbit_node():
    """A private RabbitMQ node with the management plugin (the taskmanager makes guests'
    broker users through it), for tests that do not stop it."""
    node = RabbitNode(management=True)
    try:
        node.start()
        yield node
    finally:
        node.cleanup()


@pytest.fixture(scope="package")
def pg_server():
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def vhost(rabbit_node):
    """A vhost of its own on the shared private node (dropped with its queues)."""
    made = Vhost([rabbit_node]).create()
    yield made
    made.api("DELETE", f"vhosts/{made.name}")


@pytest.fixture
def database_url(pg_server):
    return pg_server.create_database(f"fault_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def make_system(monkeypatch, tmp_path):
    """make_system(broker_url, database_url, admin_url, **env) -> System, closed afterwards."""
    made = []

    def make(broker_url: str, database_url: str, admin_url: str | None = None, **env) -> System:
        made.append(System(monkeypatch, tmp_path, broker_url, database_url, admin_url, **env))
        return made[-1]
    yield make
    for system in made:
        system.close()
