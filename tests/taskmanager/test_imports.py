"""The taskmanager holds no database credentials: its modules must not load the database
layer, nor the conductor (which is made of it)."""

import pytest

from tests.guestagent.test_guest_imports import loaded_after

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


@pytest.mark.xfail(strict=True, reason=(
    "dbaas/celery.py imports dbaas.db (engine disposal after fork) and celeryconfig.imports "
    "makes every worker, the taskmanager too, import workers.conductor.tasks"))
def test_the_taskmanager_worker_loads_no_database_layer():
    # What `celery -A dbaas worker -Q trove-taskmanager` imports: the app, then celeryconfig.imports.
    assert database_layer("dbaas.celery", "workers.conductor.tasks", "workers.taskmanager.tasks") == set()
