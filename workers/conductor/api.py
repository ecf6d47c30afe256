"""The conductor's client: how every other control-plane process reaches the database.

The client half of Trove's api/manager split: each method here sends the task of the same
name, which ``tasks.py`` serves. Calls wait for the answer (reads, and writes whose result
the caller needs); casts return once the broker has the message. All of it goes to the
control queue, never behind the guests' heartbeats. Task names are constants here, so
``grep`` finds every sender.

A ``project_id`` of None means every project (the operator's CLI); the REST API always
passes the tenant's, and an object of another project reads exactly like a missing one.
"""

from dbaas.rpc import Client

INSTANCE_CREATE = "conductor.instance_create"
INSTANCE_SHOW = "conductor.instance_show"
INSTANCE_LIST = "conductor.instance_list"
INSTANCE_COUNTS = "conductor.instance_counts"
INSTANCE_DELETE = "conductor.instance_delete"
INSTANCE_RESTART = "conductor.instance_restart"
INSTANCE_RESET_STATUS = "conductor.instance_reset_status"
INSTANCE_RESET_PASSWORD = "conductor.instance_reset_password"
INSTANCE_GUESTS = "conductor.instance_guests"
INSTANCE_UPDATE = "conductor.instance_update"
INSTANCE_DELETED = "conductor.instance_deleted"
BACKUP_CREATE = "conductor.backup_create"
BACKUP_SHOW = "conductor.backup_show"
BACKUP_LIST = "conductor.backup_list"
BACKUP_DELETE = "conductor.backup_delete"
BACKUP_FAIL = "conductor.backup_fail"
BACKUP_DELETED = "conductor.backup_deleted"
QUOTA_SHOW = "conductor.quota_show"
QUOTA_UPDATE = "conductor.quota_update"
SWEEP = "conductor.sweep"


class ConductorAPI(Client):
    # --- instances: calls

    def instance_create(self, instance_id: str, name: str, datastore: str | None = None,
                        restore_from: str | None = None, project_id: str | None = None,
                        datastore_version: str | None = None, flavor_id: str | None = None,
                        volume_size: int | None = None) -> dict:
        """Record an instance in BUILD, within its project's quota (OverLimit), and hand
        it to the taskmanager; the new record, with its administrator's ``password`` for a
        datastore with users (it is shown at create only). ``instance_id`` is chosen by the
        caller so that a retried create is the same create; ``restore_from`` is a
        COMPLETED backup's id (its datastore and version are taken)."""
        return self.call(INSTANCE_CREATE, instance_id, name, datastore=datastore,
                         restore_from=restore_from, project_id=project_id,
                         datastore_version=datastore_version, flavor_id=flavor_id,
                         volume_size=volume_size)

    def instance_show(self, instance_id: str, project_id: str | None = None) -> dict:
        return self.call(INSTANCE_SHOW, instance_id, project_id=project_id)

    def instance_list(self, project_id: str | None = None, limit: int | None = None,
                      marker: str | None = None) -> list[dict]:
        """Oldest first; at most ``limit``, after the instance ``marker`` when given."""
        return self.call(INSTANCE_LIST, project_id=project_id, limit=limit, marker=marker)

    def instance_counts(self) -> dict[str, int]:
        """Live instances of every project by status: ``{"ACTIVE": 3, "BUILD": 1}``."""
        return self.call(INSTANCE_COUNTS)

    def instance_delete(self, instance_id: str, project_id: str | None = None) -> dict:
        """Mark it DELETING and hand it to the taskmanager, which reports instance_deleted."""
        return self.call(INSTANCE_DELETE, instance_id, project_id=project_id)

    def instance_restart(self, instance_id: str, project_id: str | None = None) -> dict:
        """REBOOT until the guest reports: its datastore restarted, or a guest that was
        gone started again."""
        return self.call(INSTANCE_RESTART, instance_id, project_id=project_id)

    def instance_reset_password(self, instance_id: str, project_id: str | None = None) -> dict:
        """A new password for the administrator user: ``{"instance", "user", "password"}``
        (shown only in this answer); the guest sets it."""
        return self.call(INSTANCE_RESET_PASSWORD, instance_id, project_id=project_id)

    def instance_reset_status(self, instance_id: str, project_id: str | None = None) -> dict:
        """Clear a fault, a stuck task and a sticky status: ``{"instance", "cleared"}``."""
        return self.call(INSTANCE_RESET_STATUS, instance_id, project_id=project_id)

    # --- instances: for the taskmanager

    def instance_guests(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        """Every live instance, oldest first, in pages, as its guest needs it started:
        ``{"id", "datastore", "generation", "task_status", "fault_kind"}``."""
        return self.call(INSTANCE_GUESTS, limit=limit, marker=marker)

    def instance_update(self, instance_id: str, **fields) -> None:
        self.cast(INSTANCE_UPDATE, instance_id, **fields)

    def instance_deleted(self, instance_id: str) -> None:
        """Everything of the instance is gone: the record goes and its guest's key stops
        verifying."""
        self.cast(INSTANCE_DELETED, instance_id)

    # --- backups: calls

    def backup_create(self, backup_id: str, instance_id: str, name: str,
                      description: str | None = None, project_id: str | None = None) -> dict:
        """Record a NEW backup of an ACTIVE instance, within its project's quota
        (OverLimit), and hand it to the taskmanager; the new record."""
        return self.call(BACKUP_CREATE, backup_id, instance_id, name, description=description,
                         project_id=project_id)

    def backup_show(self, backup_id: str, project_id: str | None = None) -> dict:
        return self.call(BACKUP_SHOW, backup_id, project_id=project_id)

    def backup_list(self, project_id: str | None = None, instance_id: str | None = None,
                    datastore: str | None = None, limit: int | None = None,
                    marker: str | None = None) -> list[dict]:
        """Oldest first; at most ``limit``, after the backup ``marker`` when given."""
        return self.call(BACKUP_LIST, project_id=project_id, instance_id=instance_id,
                         datastore=datastore, limit=limit, marker=marker)

    def backup_delete(self, backup_id: str, project_id: str | None = None) -> dict:
        return self.call(BACKUP_DELETE, backup_id, project_id=project_id)

    # --- backups: casts from the taskmanager

    def backup_fail(self, backup_id: str, reason: str) -> None:
        self.cast(BACKUP_FAIL, backup_id, reason)

    def backup_deleted(self, backup_id: str) -> None:
        self.cast(BACKUP_DELETED, backup_id)

    # --- quotas: calls

    def quota_show(self, project_id: str) -> dict:
        """``{"project_id", "instances": {"limit", "in_use", "default"}, "backups": {…}}``"""
        return self.call(QUOTA_SHOW, project_id)

    def quota_update(self, project_id: str, **limits: int | None) -> dict:
        """Set ``instances=`` / ``backups=`` limits of the project (None: back to the
        default); answers what quota_show answers."""
        return self.call(QUOTA_UPDATE, project_id, **limits)

    # --- beat

    def sweep(self) -> None:
        self.cast(SWEEP)
