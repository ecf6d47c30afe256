"""The taskmanager holds no database credentials: its modules must not load the database
layer, nor the conductor's server side (which is made of it). The conductor's client,
``workers.conductor.api``, is how it reaches the database: that one it may load."""

import subprocess
import sys

from tests.support.services import ROOT, project_env
from tests.workers.guestagent.test_guest_imports import loaded_after

DATABASE_LAYER = ("sqlalchemy", "psycopg2", "alembic", "dbaas.db", "dbaas.models",
                  "dbaas.migrations", "workers.conductor")
# The conductor's package (a docstring) and its client module: no database in them.
ALLOWED = ("workers.conductor", "workers.conductor.api")


def forbidden(loaded) -> set[str]:
    return {name for name in loaded if name not in ALLOWED
            and any(name == f or name.startswith(f + ".") for f in DATABASE_LAYER)}


def database_layer(*modules: str) -> set[str]:
    return forbidden(loaded_after(*modules))


def test_the_taskmanagers_logic_loads_no_database_layer():
    loaded = loaded_after("workers.taskmanager.manager", "workers.taskmanager.compute.local",
                          "workers.taskmanager.task_base", "workers.taskmanager.guests",
                          "workers.taskmanager.api")
    assert forbidden(loaded) == set()
    # It talks to the conductor through its client (so the allowance is not vacuous).
    assert "workers.conductor.api" in loaded


def test_the_conductors_client_loads_no_database_layer():
    assert database_layer("workers.conductor.api") == set()


def test_the_check_itself_sees_the_conductors_server_side():
    """Guard against a vacuous pass: the conductor's own modules are detected."""
    assert {"workers.conductor.manager", "dbaas.db", "sqlalchemy"} <= database_layer("workers.conductor.manager")


def test_the_task_module_adds_nothing_to_what_the_celery_app_loads():
    assert "dbaas.models" not in database_layer("workers.taskmanager.tasks")
    assert database_layer("workers.taskmanager.tasks") == database_layer("dbaas.celery") == set()


def test_the_taskmanager_worker_loads_no_database_layer():
    """What `celery -A dbaas worker -Q trove-taskmanager` imports before it serves."""
    script = ("import sys; from celery import signals; from dbaas.celery import app; "
              "signals.celeryd_init.send(sender='t', instance=None, conf=app.conf, "
              "options={'queues': ['trove-taskmanager']}); "
              "assert 'taskmanager.create_instance' in app.tasks; "
              "assert 'conductor.instance_create' not in app.tasks; "
              "print('\\n'.join(sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=project_env(),
                            check=True, capture_output=True, text=True).stdout.split()
    assert sorted(forbidden(loaded)) == []


def test_the_taskmanager_reaches_guests_only_through_their_api():
    """Of the guest package, the control plane imports only ``workers.guestagent.api`` (and
    what it is made of): no agent, no datastore, no guest-side client."""
    loaded = loaded_after("workers.taskmanager.tasks", "workers.taskmanager.compute.local")
    guest_side = {name for name in loaded if name.startswith("workers.guestagent")}
    assert "workers.guestagent.api" in guest_side
    assert guest_side <= {"workers.guestagent", "workers.guestagent.api",
                          "workers.guestagent.commands", "workers.guestagent.config",
                          "workers.guestagent.pidlock"}
