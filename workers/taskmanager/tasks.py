"""Every task the taskmanager serves, by its public name (``api.py`` holds the names).
Bodies only hand over to the manager."""

from celery import signals

from dbaas.celery import app
from workers.conductor.api import ConductorAPI
from workers.taskmanager import api
from workers.taskmanager.compute import get_driver
from workers.taskmanager.manager import Manager
from workers.taskmanager.task_base import TaskmanagerTask

_manager: Manager | None = None


def manager() -> Manager:
    global _manager
    if _manager is None:
        _manager = Manager(get_driver(), ConductorAPI(app))
    return _manager


@app.task(name=api.CREATE_INSTANCE, base=TaskmanagerTask)
def create_instance(instance_id: str, datastore: str, restore_location: str | None, generation: int):
    manager().create_instance(instance_id, datastore, restore_location, generation)


# ``generation`` may be missing from a message sent before it was added.
@app.task(name=api.DELETE_INSTANCE, base=TaskmanagerTask)
def delete_instance(instance_id: str, generation: int | None = None):
    manager().delete_instance(instance_id, generation)


@app.task(name=api.RESTART_INSTANCE, base=TaskmanagerTask)
def restart_instance(instance_id: str, generation: int, datastore: str):
    manager().restart_instance(instance_id, generation, datastore)


@app.task(name=api.RESET_PASSWORD, base=TaskmanagerTask)
def reset_password(instance_id: str, generation: int, password_generation: int):
    manager().reset_password(instance_id, generation, password_generation)


@app.task(name=api.RECONCILE, base=TaskmanagerTask)
def reconcile():
    manager().reconcile()


@signals.worker_ready.connect
def reconcile_on_start(**_):
    """Guests that died while no taskmanager ran come back now, not at beat's next tick;
    done by a pool process like any task, so the guests it starts are reaped there."""
    api.TaskmanagerAPI(app).reconcile()


@app.task(name=api.CREATE_BACKUP, base=TaskmanagerTask)
def create_backup(backup_id: str, instance_id: str, generation: int):
    manager().create_backup(backup_id, instance_id, generation)


@app.task(name=api.DELETE_BACKUP, base=TaskmanagerTask)
def delete_backup(backup_id: str, location: str | None):
    manager().delete_backup(backup_id, location)
