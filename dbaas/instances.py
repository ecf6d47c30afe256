"""Instances as the control plane records them: creation with guest credentials, views."""

import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dbaas.models import GuestCredential, Instance
from dbaas.status import api_status, operating_status

DATASTORES = ("sqlite", "postgresql")
MAX_NAME_LENGTH = 255


class InvalidRequest(Exception):
    """The request cannot be carried out as asked (bad name, unknown id…)."""


def validate_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidRequest(f"instance name must be 1 to {MAX_NAME_LENGTH} printable characters")
    return name


def create_instance(session: Session, name: str, datastore: str = "sqlite",
                    tenant_id: str = "default") -> tuple[Instance, str]:
    """Record a new instance in BUILD and issue its guest's secret."""
    if datastore not in DATASTORES:
        raise InvalidRequest(f"unknown datastore {datastore!r}; choose one of {', '.join(DATASTORES)}")
    instance = Instance(name=validate_name(name), datastore=datastore, tenant_id=tenant_id,
                        task_status="BUILDING")
    session.add(instance)
    session.flush()
    secret = secrets.token_hex(32)
    session.add(GuestCredential(instance_id=instance.id, secret=secret))
    return instance, secret


def get_instance(session: Session, instance_id: str) -> Instance:
    instance = session.get(Instance, instance_id)
    if instance is None or instance.deleted:
        raise InvalidRequest(f"no instance {instance_id!r}")
    return instance


def list_instances(session: Session) -> list[Instance]:
    return list(session.scalars(
        select(Instance).where(Instance.deleted.is_(False)).order_by(Instance.created)))


def iso_utc(moment: datetime | None) -> str | None:
    return moment.isoformat() + "Z" if moment else None


def instance_view(instance: Instance) -> dict:
    return {
        "id": instance.id,
        "name": instance.name,
        "datastore": instance.datastore,
        "status": api_status(deleted=instance.deleted, task_status=instance.task_status,
                             service_status=instance.service_status, fault_kind=instance.fault_kind),
        "operating_status": operating_status(instance.service_status),
        "service_status": instance.service_status,
        "task_status": instance.task_status,
        "last_heartbeat": iso_utc(instance.last_heartbeat),
        "guest_agent_version": instance.guest_agent_version,
        "fault": {"kind": instance.fault_kind, "message": instance.fault_message,
                  "created": iso_utc(instance.fault_at)} if instance.fault_kind else None,
        "host": instance.host,
        "port": instance.port,
        "created": iso_utc(instance.created),
    }
