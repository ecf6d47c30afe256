"""The client side of the conductor's CRUD tasks: the taskmanager's only way to write.

Sent by name; ``dbaas.celery`` signs every message with the service key on the way out.
"""

from celery import Celery


class ConductorApi:
    def __init__(self, app: Celery):
        self.app = app

    def _send(self, task: str, *args, **kwargs) -> None:
        self.app.send_task(f"conductor.{task}", args=list(args), kwargs=kwargs)

    def instance_update(self, instance_id: str, **fields) -> None:
        self._send("instance_update", instance_id, **fields)

    def instance_delete(self, instance_id: str) -> None:
        self._send("instance_delete", instance_id)

    def backup_fail(self, backup_id: str, reason: str) -> None:
        self._send("backup_fail", backup_id, reason)

    def backup_delete(self, backup_id: str) -> None:
        self._send("backup_delete", backup_id)
