"""Model CRUD for the control-plane services (taskmanager, API). Never callable by guests."""

from datetime import datetime, timezone

from sqlalchemy.orm import Session

from dbaas import wire
from dbaas.models import Backup, GuestCredential, Instance
from workers.conductor.messages import MessageRejected


def _text(limit: int | None):
    def check(value):
        if value is None or (isinstance(value, str) and (limit is None or len(value) <= limit)):
            return value
        raise ValueError(f"a string of at most {limit} characters" if limit else "a string")
    return check


def _service_status(value):
    if value is None or (isinstance(value, str) and value in wire.SERVICE_STATUSES):
        return value
    raise ValueError("a wire status")


def _moment(value):
    """ISO 8601 over JSON (a datetime in-process); stored as naive UTC like every time."""
    if value is None:
        return None
    if isinstance(value, str):
        moment = datetime.fromisoformat(value)
    elif isinstance(value, datetime):
        moment = value
    else:
        raise ValueError("an ISO 8601 time")
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def _port(value):
    if value is None or (type(value) is int and 0 < value < 65536):
        return value
    raise ValueError("a port number")


INSTANCE_UPDATABLE = {
    "task_status": _text(32), "service_status": _service_status, "fault_kind": _text(32),
    "fault_message": _text(None), "fault_at": _moment, "host": _text(255), "port": _port,
}


def instance_update(session: Session, instance_id: str, fields: dict) -> None:
    unknown = set(fields) - INSTANCE_UPDATABLE.keys()
    if unknown:
        raise MessageRejected(f"instance fields not updatable: {sorted(unknown)}")
    values = {}
    for name, value in fields.items():
        try:
            values[name] = INSTANCE_UPDATABLE[name](value)
        except ValueError as exc:
            raise MessageRejected(f"{name} must be {exc}") from None
    instance = session.get(Instance, instance_id)
    if instance is None or instance.deleted:
        raise MessageRejected(f"instance {instance_id} does not exist")
    for name, value in values.items():
        setattr(instance, name, value)


def backup_create(session: Session, backup_id: str, instance_id: str, name: str,
                  description: str | None = None) -> None:
    """Idempotent: a redelivered create finds its backup already there."""
    if session.get(Backup, backup_id) is not None:
        return
    instance = session.get(Instance, instance_id)
    if instance is None or instance.deleted:
        raise MessageRejected(f"instance {instance_id} does not exist")
    session.add(Backup(id=backup_id, instance_id=instance_id, tenant_id=instance.tenant_id,
                       name=name, description=description))


def instance_delete(session: Session, instance_id: str, now: datetime) -> None:
    """Idempotent: marks the instance and its backups deleted and revokes the guest's key."""
    instance = session.get(Instance, instance_id)
    if instance is None:
        raise MessageRejected(f"instance {instance_id} does not exist")
    if instance.deleted:
        return
    instance.deleted, instance.deleted_at, instance.task_status = True, now, "NONE"
    credential = session.get(GuestCredential, instance_id)
    if credential is not None and credential.revoked_at is None:
        credential.revoked_at = now


def backup_delete(session: Session, backup_id: str, now: datetime) -> None:
    backup = session.get(Backup, backup_id)
    if backup is None:
        raise MessageRejected(f"backup {backup_id} does not exist")
    if not backup.deleted:
        backup.deleted, backup.deleted_at = True, now


def backup_fail(session: Session, backup_id: str, reason: str, now: datetime) -> None:
    """The control plane gives up on a backup (its guest cannot be reached); final states
    stay as they are."""
    backup = session.get(Backup, backup_id)
    if backup is None:
        raise MessageRejected(f"backup {backup_id} does not exist")
    if backup.state not in wire.FINAL_BACKUP_STATES:
        backup.state, backup.fail_reason, backup.updated = "FAILED", str(reason)[:2000], now
