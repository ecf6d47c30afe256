"""The serving half of ``api.py``: one function per call or cast, same names, each taking a
session and primitives and returning primitives. ``tasks.py`` decodes a message and calls
one of these inside one transaction; the entity rules live in ``instances.py`` and
``backups.py``. Work for the taskmanager is handed over only after the transaction
committed, so the taskmanager never looks for a row that is not there.
"""

import uuid

from sqlalchemy.orm import Session

from dbaas import db
from dbaas.celery import app
from dbaas.errors import InvalidRequest
from dbaas.models import Instance, utcnow
from workers.conductor import backups, instances, quotas, sweeps
from workers.guestagent.api import DATASTORES
from workers.taskmanager.api import TaskmanagerAPI

_taskmanager: TaskmanagerAPI | None = None


def taskmanager() -> TaskmanagerAPI:
    global _taskmanager
    if _taskmanager is None:
        _taskmanager = TaskmanagerAPI(app)
    return _taskmanager


def new_id(value, what: str) -> str:
    """A caller-chosen id must be a canonical UUID: it becomes a path and a queue name."""
    try:
        if isinstance(value, str) and str(uuid.UUID(value)) == value:
            return value
    except ValueError:
        pass
    raise InvalidRequest(f"{what} id must be a canonical UUID")


# --- instances -------------------------------------------------------------------------------

def instance_create(session: Session, instance_id, name, datastore=None, restore_from=None,
                    project_id=None, datastore_version=None, flavor_id=None,
                    volume_size=None) -> dict:
    instance_id = new_id(instance_id, "instance")
    project_id = project_id or instances.DEFAULT_PROJECT
    restore_location = None
    if restore_from is not None:
        datastore, datastore_version, restore_location = backups.restore_source(
            session, restore_from, datastore, project_id, version=datastore_version)
    instance, _created = instances.create(session, instance_id, name, datastore, project_id,
                                          datastore_version=datastore_version,
                                          flavor_id=flavor_id, volume_size=volume_size)
    if instance.task_status == "BUILDING":
        # Also when a retried create found the instance: handing it over twice is harmless
        # (the taskmanager's create is idempotent), never handing it over is not.
        args = (instance.id, instance.datastore, restore_location, instance.credential_generation)
        db.after_commit(session, lambda: taskmanager().create_instance(*args))
    view = instances.view(instance)
    if password := instances.admin_password(instance):
        view["password"] = password
    return view


def instance_show(session: Session, instance_id, project_id=None) -> dict:
    return instances.view(instances.get(session, instance_id, project_id))


def instance_list(session: Session, project_id=None, limit=None, marker=None) -> list[dict]:
    return [instances.view(i) for i in instances.listing(session, project_id, limit=limit,
                                                         marker=marker)]


def instance_counts(session: Session) -> dict[str, int]:
    return instances.count_by_status(session)


def instance_delete(session: Session, instance_id, project_id=None) -> dict:
    instance = instances.request_delete(session, instance_id, project_id)
    args = (instance.id, instance.credential_generation)
    db.after_commit(session, lambda: taskmanager().delete_instance(*args))
    return instances.view(instance)


def instance_restart(session: Session, instance_id, project_id=None) -> dict:
    instance = instances.request_restart(session, instance_id, project_id)
    args = (instance.id, instance.credential_generation, instance.datastore)
    db.after_commit(session, lambda: taskmanager().restart_instance(*args))
    return instances.view(instance)


def instance_reset_password(session: Session, instance_id, project_id=None) -> dict:
    instance = instances.reset_password(session, instance_id, project_id)
    args = (instance.id, instance.credential_generation, instance.password_generation)
    db.after_commit(session, lambda: taskmanager().reset_password(*args))
    return {"instance": instances.view(instance), "user": DATASTORES[instance.datastore].admin_user,
            "password": instances.admin_password(instance)}


def instance_guests(session: Session, limit=None, marker=None) -> list[dict]:
    return instances.guests(session, limit=limit, marker=marker)


def instance_reset_status(session: Session, instance_id, project_id=None) -> dict:
    instance, cleared = instances.reset_status(session, instance_id, project_id)
    return {"instance": instances.view(instance), "cleared": cleared}


def instance_update(session: Session, instance_id, fields: dict) -> None:
    instances.update(session, instance_id, fields)


def instance_deleted(session: Session, instance_id) -> None:
    instances.deleted(session, instance_id, utcnow())


# --- backups ---------------------------------------------------------------------------------

def backup_create(session: Session, backup_id, instance_id, name, description=None,
                  project_id=None) -> dict:
    backup_id = new_id(backup_id, "backup")
    backup, _created = backups.create(session, backup_id, instance_id, name, description, project_id)
    if backup.state == "NEW":
        generation = session.get(Instance, backup.instance_id).credential_generation
        args = (backup.id, backup.instance_id, generation)
        db.after_commit(session, lambda: taskmanager().create_backup(*args))
    return backups.view(backup)


def backup_show(session: Session, backup_id, project_id=None) -> dict:
    return backups.view(backups.get(session, backup_id, project_id))


def backup_list(session: Session, project_id=None, instance_id=None, datastore=None, limit=None,
                marker=None) -> list[dict]:
    if instance_id is not None:
        instances.get(session, instance_id, project_id)  # another project's: not found
    return [backups.view(b) for b in backups.listing(session, project_id, instance_id,
                                                     datastore=datastore, limit=limit,
                                                     marker=marker)]


def backup_delete(session: Session, backup_id, project_id=None) -> dict:
    backup = backups.request_delete(session, backup_id, project_id)
    args = (backup.id, backup.location)
    db.after_commit(session, lambda: taskmanager().delete_backup(*args))
    return backups.view(backup)


def backup_fail(session: Session, backup_id, reason) -> None:
    backups.fail(session, backup_id, reason, utcnow())


def backup_deleted(session: Session, backup_id) -> None:
    backups.deleted(session, backup_id, utcnow())


# --- quotas --------------------------------------------------------------------------------

def quota_show(session: Session, project_id) -> dict:
    return quotas.show(session, project_id)


def quota_update(session: Session, project_id, limits: dict) -> dict:
    return quotas.update(session, project_id, limits)


# --- beat ------------------------------------------------------------------------------------

def sweep(session: Session, *, usage_timeout: float, agent_heartbeat_expiry: float,
          backup_timeout: float) -> dict:
    return sweeps.sweep(session, utcnow(), usage_timeout=usage_timeout,
                        agent_heartbeat_expiry=agent_heartbeat_expiry, backup_timeout=backup_timeout)

