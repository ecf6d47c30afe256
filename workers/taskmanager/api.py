"""The taskmanager's client: casts that hand it work (sent by the conductor once the
record they are about has committed, by beat, and by a taskmanager starting). Each method
sends the task of the same name, which ``tasks.py`` serves; names are constants here.

Messages about a guest carry the generation of its credentials, so the taskmanager derives
the guest's key instead of reading it from anywhere.
"""

from dbaas.rpc import Client

CREATE_INSTANCE = "taskmanager.create_instance"
DELETE_INSTANCE = "taskmanager.delete_instance"
RESTART_INSTANCE = "taskmanager.restart_instance"
RESET_PASSWORD = "taskmanager.reset_password"
RECONCILE = "taskmanager.reconcile"
CREATE_BACKUP = "taskmanager.create_backup"
DELETE_BACKUP = "taskmanager.delete_backup"


class TaskmanagerAPI(Client):
    def create_instance(self, instance_id: str, datastore: str, restore_location: str | None,
                        generation: int) -> None:
        self.cast(CREATE_INSTANCE, instance_id, datastore, restore_location, generation)

    def delete_instance(self, instance_id: str, generation: int) -> None:
        self.cast(DELETE_INSTANCE, instance_id, generation)

    def restart_instance(self, instance_id: str, generation: int, datastore: str) -> None:
        """Restart the datastore, or start a guest again if none runs."""
        self.cast(RESTART_INSTANCE, instance_id, generation, datastore)

    def reset_password(self, instance_id: str, generation: int, password_generation: int) -> None:
        """Have the guest set its administrator's password of ``password_generation``."""
        self.cast(RESET_PASSWORD, instance_id, generation, password_generation)

    def reconcile(self) -> None:
        """Start a guest for every instance that should have one and has none."""
        self.cast(RECONCILE)

    def create_backup(self, backup_id: str, instance_id: str, generation: int) -> None:
        self.cast(CREATE_BACKUP, backup_id, instance_id, generation)

    def delete_backup(self, backup_id: str, location: str | None) -> None:
        self.cast(DELETE_BACKUP, backup_id, location)
