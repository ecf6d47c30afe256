"""Model CRUD for the control-plane services (taskmanager, API). Never callable by guests."""

from sqlalchemy.orm import Session

from dbaas.models import Backup, Instance
from workers.conductor.messages import MessageRejected

INSTANCE_UPDATABLE = frozenset({
    "task_status", "service_status", "fault_kind", "fault_message", "fault_at", "host", "port",
})


def instance_update(session: Session, instance_id: str, fields: dict) -> None:
    unknown = set(fields) - INSTANCE_UPDATABLE
    if unknown:
        raise MessageRejected(f"instance fields not updatable: {sorted(unknown)}")
    instance = session.get(Instance, instance_id)
    if instance is None or instance.deleted:
        raise MessageRejected(f"instance {instance_id} does not exist")
    for name, value in fields.items():
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
