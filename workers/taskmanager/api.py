"""The client side of the taskmanager: enqueue its tasks by name (manage.py, the API).

Call these only after the transaction that recorded the instance or backup committed, so
the taskmanager never acts on a row that is not there.
"""

from dbaas.celery import app


def _send(task: str, *args) -> None:
    app.send_task(f"taskmanager.{task}", args=list(args))


def create_instance(instance_id: str, datastore: str, restore_location: str | None = None) -> None:
    _send("create_instance", instance_id, datastore, restore_location)


def delete_instance(instance_id: str) -> None:
    _send("delete_instance", instance_id)


def restart_instance(instance_id: str) -> None:
    _send("restart_instance", instance_id)


def create_backup(backup_id: str, instance_id: str) -> None:
    _send("create_backup", backup_id, instance_id)


def delete_backup(backup_id: str, location: str | None) -> None:
    _send("delete_backup", backup_id, location)
