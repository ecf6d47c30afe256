"""Backups: every rule about them, as plain functions taking a session and primitives —
what the control plane asks (create, fail, delete) and what a guest reports
(conductor.update_backup)."""

import time
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dbaas import settings, wire
from dbaas.errors import Conflict, InvalidRequest, not_found
from dbaas.models import Backup, Instance, utcnow
from workers.conductor import instances, ordering, paging, quotas
from workers.conductor.messages import BackupUpdate, MessageRejected, parse_backup_update

IN_PROGRESS_STATES = frozenset(wire.BACKUP_STATE_RANK) - wire.FINAL_BACKUP_STATES


def view(backup: Backup) -> dict:
    return {
        "id": backup.id,
        "name": backup.name,
        "description": backup.description,
        "instance_id": backup.instance_id,
        "project_id": backup.tenant_id,
        "datastore": backup.datastore,
        "datastore_version": backup.datastore_version,
        "state": backup.state,
        "size": backup.size,
        "checksum": backup.checksum,
        "location": backup.location,
        "backup_type": backup.backup_type,
        "fail_reason": backup.fail_reason,
        "created": instances.iso_utc(backup.created),
        "updated": instances.iso_utc(backup.updated),
    }


def get(session: Session, backup_id, project_id: str | None = None, *,
        for_update: bool = False) -> Backup:
    backup = None
    if isinstance(backup_id, str) and len(backup_id) <= 64 and backup_id.isprintable():
        statement = select(Backup).where(Backup.id == backup_id)
        backup = session.scalar(statement.with_for_update() if for_update else statement)
    if backup is None or backup.deleted or project_id not in (None, backup.tenant_id):
        raise not_found("backup", backup_id)
    return backup


def listing(session: Session, project_id: str | None = None, instance_id: str | None = None, *,
            datastore: str | None = None, limit: int | None = None,
            marker: str | None = None) -> list[Backup]:
    statement = select(Backup).where(Backup.deleted.is_(False))
    if project_id is not None:
        statement = statement.where(Backup.tenant_id == quotas.validate_project(project_id))
    if instance_id is not None:
        statement = statement.where(Backup.instance_id == instance_id)
    if datastore is not None:
        datastore, _version = instances.validate_datastore(datastore, None)
        statement = statement.where(Backup.datastore == datastore)
    return list(session.scalars(paging.page(session, statement, Backup, project_id, limit, marker)))


def restore_source(session: Session, backup_id, datastore: str | None, project_id: str | None, *,
                   version: str | None = None) -> tuple[str, str, str]:
    """(datastore, version, location) of a backup a new instance may be restored from."""
    backup = get(session, backup_id, project_id)
    if backup.state != "COMPLETED" or not backup.location:
        raise Conflict(f"backup {backup_id} is {backup.state}: only a COMPLETED backup can be restored")
    source = session.get(Instance, backup.instance_id)
    source_datastore, source_version = instances.validate_datastore(
        backup.datastore or source.datastore, backup.datastore_version or source.datastore_version)
    if datastore not in (None, source_datastore):
        raise InvalidRequest(f"backup {backup_id} is of a {source_datastore} instance, not {datastore}")
    if version not in (None, source_version):
        raise InvalidRequest(f"backup {backup_id} is of {source_datastore} {source_version}, not {version}")
    return source_datastore, source_version, backup.location


def create(session: Session, backup_id: str, instance_id, name, description,
           project_id: str | None) -> tuple[Backup, bool]:
    """A NEW backup of an ACTIVE instance, within the project's quota: (backup, created
    now). Idempotent on ``backup_id``, like instance creation."""
    name = instances.validate_name(name, "backup")
    if description is not None and not (isinstance(description, str) and len(description) <= 2000
                                        and "\0" not in description):
        raise InvalidRequest("description must be a string of at most 2000 characters")
    # The instance tells whose quota counts (the operator passes no project); its project's
    # row is locked before the instance's, the order every create takes.
    owner = instances.get(session, instance_id, project_id).tenant_id
    project = quotas.lock(session, owner)
    existing = session.get(Backup, backup_id)
    if existing is not None:
        if existing.deleted or project_id not in (None, existing.tenant_id):
            raise Conflict(f"backup id {backup_id} is taken")
        return existing, False
    instance = instances.get(session, instance_id, project_id, for_update=True)
    status = instances.view(instance)["status"]
    if status != "ACTIVE":
        raise Conflict(f"instance {instance_id} is {status}: only an ACTIVE instance can be backed up")
    quotas.check(session, project, quotas.BACKUPS)
    backup = Backup(id=backup_id, instance_id=instance.id, tenant_id=instance.tenant_id,
                    name=name, description=description, datastore=instance.datastore,
                    datastore_version=instance.datastore_version)
    session.add(backup)
    session.flush()
    return backup, True


def request_delete(session: Session, backup_id, project_id: str | None = None) -> Backup:
    """Checks that it may go; the taskmanager removes its file and reports ``deleted``."""
    backup = get(session, backup_id, project_id)
    if backup.state in IN_PROGRESS_STATES:
        raise Conflict(f"backup {backup_id} is {backup.state}: wait until it is COMPLETED or FAILED")
    return backup


def deleted(session: Session, backup_id: str, now: datetime) -> None:
    backup = session.get(Backup, backup_id)
    if backup is None:
        raise not_found("backup", backup_id)
    if not backup.deleted:
        backup.deleted, backup.deleted_at = True, now


def fail(session: Session, backup_id: str, reason: str, now: datetime) -> None:
    """The control plane gives up on a backup (its guest cannot be reached); final states
    stay as they are."""
    backup = session.get(Backup, backup_id)
    if backup is None:
        raise not_found("backup", backup_id)
    if backup.state not in wire.FINAL_BACKUP_STATES:
        backup.state, backup.fail_reason, backup.updated = "FAILED", str(reason)[:2000], now


# --- what guests report --------------------------------------------------------------------

def apply_update(session: Session, change: BackupUpdate, now: datetime) -> bool:
    """Apply a guest's ``change`` if it is the newest for its backup; False when stale.

    Raises MessageRejected (and the caller rolls back) when the backup is not the
    sender's or the state would move backwards.
    """
    backup = session.scalar(
        select(Backup).where(Backup.id == change.backup_id).with_for_update())
    if backup is None or backup.deleted:
        raise MessageRejected(f"backup {change.backup_id} does not exist")
    if backup.instance_id != change.instance_id:
        raise MessageRejected(f"backup {change.backup_id} does not belong to the sender's instance")
    if not ordering.advance(session, ordering.BACKUP, {backup.id: change.sent}):
        return False
    new_state = change.fields.get("state", backup.state)
    if backup.state in wire.FINAL_BACKUP_STATES:
        raise MessageRejected(f"backup is already {backup.state}")
    if wire.BACKUP_STATE_RANK[new_state] < wire.BACKUP_STATE_RANK[backup.state]:
        raise MessageRejected(f"backup state may not move from {backup.state} to {new_state}")
    for name, value in change.fields.items():
        setattr(backup, name, value)
    backup.updated = now
    return True


def parse_update(args, kwargs) -> BackupUpdate:
    return parse_backup_update(args, kwargs, time.time(), settings.get().max_clock_skew)


def handle_update(session: Session, args, kwargs, now: datetime | None = None) -> bool:
    """Validate and apply one conductor.update_backup message (already authenticated)."""
    return apply_update(session, parse_update(args, kwargs), now or utcnow())
