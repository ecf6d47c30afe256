"""The taskmanager holds no database credentials: its modules must not load the database
layer, nor the conductor (which is made of it)."""

import subprocess
import sys

from tests.workers.guestagent.test_guest_imports import loaded_after
from tests.support.services import ROOT, project_env

DATABASE_LAYER = ("sqlalchemy", "psycopg2", "alembic", "dbaas.db", "dbaas.models", "dbaas.instances",
                  "dbaas.migrations", "workers.conductor")


def database_layer(*modules: str) -> set[str]:
    return {name for name in loaded_after(*modules)
            if any(name == f or name.startswith(f + ".") for f in DATABASE_LAYER)}


def test_the_taskmanagers_logic_loads_no_database_layer():
    assert database_layer("workers.taskmanager.manager", "workers.taskmanager.compute.local",
                          "workers.taskmanager.task_base") == set()


def test_the_task_module_adds_nothing_to_what_the_celery_app_loads():
    assert "dbaas.models" not in database_layer("workers.taskmanager.tasks")
    assert database_layer("workers.taskmanager.tasks") == database_layer("dbaas.celery")


def test_the_taskmanager_worker_loads_no_database_layer():
    """What `celery -A dbaas worker -Q trove-taskmanager` imports before it serves."""
    script = ("import sys; from celery import signals; from dbaas.celery import app; "
              "signals.celeryd_init.send(sender='t', instance=None, conf=app.conf, "
              "options={'queues': ['trove-taskmanager']}); "
              "assert 'taskmanager.create_instance' in app.tasks; "
              "print('\\n'.join(sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=project_env(),
                            check=True, capture_output=True, text=True).stdout.split()
    assert [m for m in loaded if any(m == f or m.startswith(f + ".") for f in DATABASE_LAYER)] == []
