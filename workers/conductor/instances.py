"""Instances: every rule about them, as plain functions taking a session and primitives.

The conductor's tasks decode a message and call these; the CLI and the REST API reach them
only through ``workers/conductor/api.py``.
"""

import json
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy import update as update_rows
from sqlalchemy.orm import Session

from dbaas import settings, signing, wire
from dbaas.errors import Conflict, InvalidRequest, not_found
from dbaas.models import Backup, Instance, utcnow
from dbaas.status import HEARTBEAT_EXPIRED, api_status, operating_status
from workers.conductor import paging, quotas
from workers.guestagent.api import DATASTORES

MAX_NAME_LENGTH = 255
MAX_FLAVOR_ID_LENGTH = 36
DEFAULT_PROJECT = "default"
DEFAULT_DATASTORE = "sqlite"
# Faults that mean the guest is gone: a restart, which starts a guest again, clears them
# (the taskmanager's GUEST_LOST and RESPAWN_FAILED, the sweeps' heartbeat and restart
# timeouts).
GUEST_GONE_FAULTS = frozenset({HEARTBEAT_EXPIRED, "guest_lost", "respawn_failed", "restart_timeout"})


def validate_name(name, what: str = "instance") -> str:
    if not isinstance(name, str):
        raise InvalidRequest(f"{what} name must be a string")
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidRequest(f"{what} name must be 1 to {MAX_NAME_LENGTH} printable characters")
    return name


def validate_datastore(datastore, version) -> tuple[str, str]:
    """(datastore, version), the datastore's default version when none is asked for."""
    datastore = datastore or DEFAULT_DATASTORE
    if not isinstance(datastore, str) or datastore not in DATASTORES:
        raise InvalidRequest(f"unknown datastore {str(datastore)[:32]!r}; choose one of {', '.join(DATASTORES)}")
    versions = DATASTORES[datastore].versions
    if version is None:
        return datastore, versions[0]
    if not isinstance(version, str) or version not in versions:
        raise InvalidRequest(f"unknown version {str(version)[:32]!r} of {datastore}; choose one of {', '.join(versions)}")
    return datastore, version


def validate_flavor_and_volume(flavor_id, volume_size) -> None:
    """Which flavors exist is the API's configuration; here only their form is checked."""
    if flavor_id is not None and not (isinstance(flavor_id, str)
                                      and 0 < len(flavor_id) <= MAX_FLAVOR_ID_LENGTH
                                      and flavor_id.isprintable()):
        raise InvalidRequest(f"a flavor id is 1 to {MAX_FLAVOR_ID_LENGTH} printable characters")
    largest = settings.get().max_volume_size
    if volume_size is not None and not (type(volume_size) is int and 0 < volume_size <= largest):
        raise InvalidRequest(f"volume size must be a whole number of GB from 1 to {largest}")


def iso_utc(moment: datetime | None) -> str | None:
    return moment.isoformat() + "Z" if moment else None


def view(instance: Instance) -> dict:
    """The record as clients see it: primitives only (it crosses the broker)."""
    return {
        "id": instance.id,
        "name": instance.name,
        "project_id": instance.tenant_id,
        "datastore": instance.datastore,
        "datastore_version": instance.datastore_version,
        "flavor_id": instance.flavor_id,
        "volume_size": instance.volume_size,
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
        "connection": json.loads(instance.connection) if instance.connection else None,
        "created": iso_utc(instance.created),
        "updated": iso_utc(instance.updated),
    }


def get(session: Session, instance_id, project_id: str | None = None, *,
        for_update: bool = False) -> Instance:
    """A live instance of the project (any project when None); another project's reads
    exactly like a missing one."""
    instance = None
    # Printable only: a NUL would make PostgreSQL's driver raise instead of finding nothing.
    if isinstance(instance_id, str) and len(instance_id) <= 64 and instance_id.isprintable():
        statement = select(Instance).where(Instance.id == instance_id)
        instance = session.scalar(statement.with_for_update() if for_update else statement)
    if instance is None or instance.deleted or project_id not in (None, instance.tenant_id):
        raise not_found("instance", instance_id)
    return instance


def listing(session: Session, project_id: str | None = None, *, limit: int | None = None,
            marker: str | None = None) -> list[Instance]:
    statement = select(Instance).where(Instance.deleted.is_(False))
    if project_id is not None:
        statement = statement.where(Instance.tenant_id == quotas.validate_project(project_id))
    return list(session.scalars(paging.page(session, statement, Instance, project_id, limit, marker)))


def count_by_status(session: Session) -> dict[str, int]:
    """Live instances by API status, counted in one query (the status is derived from
    these three columns)."""
    rows = session.execute(
        select(Instance.task_status, Instance.service_status, Instance.fault_kind, func.count())
        .where(Instance.deleted.is_(False))
        .group_by(Instance.task_status, Instance.service_status, Instance.fault_kind))
    counts: dict[str, int] = {}
    for task_status, service_status, fault_kind, count in rows:
        status = api_status(deleted=False, task_status=task_status, service_status=service_status,
                            fault_kind=fault_kind)
        counts[status] = counts.get(status, 0) + count
    return counts


def create(session: Session, instance_id: str, name, datastore: str | None,
           project_id: str, *, datastore_version: str | None = None,
           flavor_id: str | None = None, volume_size: int | None = None) -> tuple[Instance, bool]:
    """Record an instance in BUILD, within the project's quota: (instance, created now).

    Idempotent on ``instance_id``: a retried or redelivered create finds the instance it
    made and returns it rather than making a second one (and counts nothing twice).
    """
    name = validate_name(name)
    datastore, datastore_version = validate_datastore(datastore, datastore_version)
    validate_flavor_and_volume(flavor_id, volume_size)
    project = quotas.lock(session, project_id)
    existing = session.get(Instance, instance_id)
    if existing is not None:
        if existing.tenant_id != project_id or existing.deleted:
            raise Conflict(f"instance id {instance_id} is taken")
        return existing, False
    quotas.check(session, project, quotas.INSTANCES)
    instance = Instance(id=instance_id, name=name, datastore=datastore,
                        datastore_version=datastore_version, flavor_id=flavor_id,
                        volume_size=volume_size, tenant_id=project_id, task_status="BUILDING",
                        credential_generation=1)
    session.add(instance)
    session.flush()
    return instance, True


def request_delete(session: Session, instance_id, project_id: str | None = None,
                   now: datetime | None = None) -> Instance:
    """Mark it DELETING; the taskmanager tears it down and reports ``deleted``. A backup
    still running fails now: its guest is about to go."""
    instance = get(session, instance_id, project_id, for_update=True)
    instance.task_status = "DELETING"
    session.execute(
        update_rows(Backup)
        .where(Backup.instance_id == instance.id, Backup.deleted.is_(False),
               Backup.state.not_in(wire.FINAL_BACKUP_STATES))
        .values(state="FAILED", fail_reason="the instance was deleted", updated=now or utcnow())
        .execution_options(synchronize_session=False))
    return instance


def deleted(session: Session, instance_id: str, now: datetime) -> None:
    """Idempotent: the instance's record ends (its backups stay, as in Trove) and its
    guest's key stops verifying (credentials are live only for a live instance)."""
    instance = session.get(Instance, instance_id)
    if instance is None:
        raise not_found("instance", instance_id)
    if instance.deleted:
        return
    instance.deleted, instance.deleted_at, instance.task_status = True, now, "NONE"


def request_restart(session: Session, instance_id, project_id: str | None = None) -> Instance:
    """REBOOT until the guest reports a settled status (heartbeats.py) or stays silent for
    the heartbeat expiry (sweeps.py); a fault that says the guest is gone is cleared, as
    the taskmanager starts a guest again when none runs. A restart during a build leaves
    it building."""
    instance = get(session, instance_id, project_id, for_update=True)
    if instance.task_status == "DELETING":
        raise Conflict(f"instance {instance.id} is being deleted")
    if instance.fault_kind in GUEST_GONE_FAULTS:
        instance.fault_kind = instance.fault_message = instance.fault_at = None
    if instance.task_status == "NONE":
        instance.task_status = "REBOOTING"
    return instance


def admin_password(instance: Instance) -> str | None:
    """The administrator's current password, derived (docs/adr/0007); None for a datastore
    without users."""
    if not DATASTORES[instance.datastore].admin_user:
        return None
    secret = signing.guest_secret(settings.get().service_key, instance.id, instance.credential_generation)
    return signing.admin_password(secret, instance.password_generation)


def reset_password(session: Session, instance_id, project_id: str | None = None) -> Instance:
    """The next generation of the administrator's password."""
    instance = get(session, instance_id, project_id, for_update=True)
    if not DATASTORES[instance.datastore].admin_user:
        raise InvalidRequest(f"a {instance.datastore} instance has no users: clients open its file")
    if instance.task_status == "DELETING":
        raise Conflict(f"instance {instance.id} is being deleted")
    instance.password_generation += 1
    return instance


def guests(session: Session, *, limit: int | None = None, marker: str | None = None) -> list[dict]:
    """Every live instance with what the taskmanager needs to start its guest, in pages."""
    statement = select(Instance).where(Instance.deleted.is_(False))
    return [{"id": i.id, "datastore": i.datastore, "generation": i.credential_generation,
             "task_status": i.task_status, "fault_kind": i.fault_kind}
            for i in session.scalars(paging.page(session, statement, Instance, None, limit, marker))]


def reset_status(session: Session, instance_id,
                 project_id: str | None = None) -> tuple[Instance, list[str]]:
    """Take an instance out of ERROR or a stuck task by hand; heartbeats set the rest."""
    instance = get(session, instance_id, project_id, for_update=True)
    cleared = []
    if instance.fault_kind:
        cleared.append(f"cleared fault {instance.fault_kind} ({instance.fault_message})")
        instance.fault_kind = instance.fault_message = instance.fault_at = None
    if instance.task_status != "NONE":
        cleared.append(f"task_status {instance.task_status} -> NONE")
        instance.task_status = "NONE"
    if instance.service_status in wire.STICKY_SERVICE_STATUSES:
        cleared.append(f"cleared service status {instance.service_status!r}")
        instance.service_status = None
    return instance, cleared


# --- what the taskmanager may set ------------------------------------------------------------

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
    """ISO 8601 over JSON; stored as naive UTC like every time."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("an ISO 8601 time")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def _port(value):
    if value is None or (type(value) is int and 0 < value < 65536):
        return value
    raise ValueError("a port number")


CONNECTION_FIELDS = {"host": _text(255), "port": _port, "user": _text(255),
                     "database": _text(255), "path": _text(4096)}


def _connection(value):
    """{host, port, user, database} or {path}; stored as JSON text."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value or not set(value) <= CONNECTION_FIELDS.keys():
        raise ValueError(f"an object of {', '.join(CONNECTION_FIELDS)}")
    for name, check in CONNECTION_FIELDS.items():
        check(value.get(name))
    return json.dumps(value)


UPDATABLE = {
    "task_status": _text(32), "service_status": _service_status, "fault_kind": _text(32),
    "fault_message": _text(None), "fault_at": _moment, "host": _text(255), "port": _port,
    "connection": _connection,
}


def update(session: Session, instance_id: str, fields: dict) -> None:
    unknown = set(fields) - UPDATABLE.keys()
    if unknown:
        raise InvalidRequest(f"instance fields not updatable: {sorted(map(str, unknown))[:10]}")
    values = {}
    for name, value in fields.items():
        try:
            values[name] = UPDATABLE[name](value)
        except ValueError as exc:
            raise InvalidRequest(f"{name} must be {exc}") from None
    instance = get(session, instance_id)
    for name, value in values.items():
        setattr(instance, name, value)
