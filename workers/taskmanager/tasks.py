"""Every task the taskmanager serves, by name (``taskmanager.*`` is routed to its queue).
Bodies only hand over to the manager."""

from dbaas.celery import app
from workers.taskmanager.compute import get_driver
from workers.taskmanager.conductor_api import ConductorApi
from workers.taskmanager.manager import Manager
from workers.taskmanager.task_base import TaskmanagerTask

_manager: Manager | None = None


def manager() -> Manager:
    global _manager
    if _manager is None:
        _manager = Manager(get_driver(), ConductorApi(app))
    return _manager


@app.task(name="taskmanager.create_instance", base=TaskmanagerTask)
def create_instance(instance_id: str, datastore: str, restore_location: str | None = None):
    manager().create_instance(instance_id, datastore, restore_location)


@app.task(name="taskmanager.delete_instance", base=TaskmanagerTask)
def delete_instance(instance_id: str):
    manager().delete_instance(instance_id)


@app.task(name="taskmanager.restart_instance", base=TaskmanagerTask)
def restart_instance(instance_id: str):
    manager().restart_instance(instance_id)


@app.task(name="taskmanager.create_backup", base=TaskmanagerTask)
def create_backup(backup_id: str, instance_id: str):
    manager().create_backup(backup_id, instance_id)


@app.task(name="taskmanager.delete_backup", base=TaskmanagerTask)
def delete_backup(backup_id: str, location: str | None):
    manager().delete_backup(backup_id, location)
