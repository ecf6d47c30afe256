"""Control-plane CRUD on a real database: workers.conductor.crud."""

import uuid
from datetime import datetime

import pytest
from sqlalchemy import func, select

from dbaas import db, instances
from dbaas.models import Backup, Instance
from workers.conductor import crud
from workers.conductor.messages import MessageRejected

INSTANCE_COLUMNS = ("name", "tenant_id", "datastore", "task_status", "service_status", "fault_kind",
                    "fault_message", "fault_at", "host", "port", "last_heartbeat",
                    "guest_agent_version", "deleted", "deleted_at")


def create_instance(name: str = "db", tenant_id: str = "tenant-7") -> str:
    return db.run_transaction(
        lambda session: instances.create_instance(session, name, tenant_id=tenant_id)[0].id)


def delete_instance(instance_id: str) -> None:
    def work(session):
        session.get(Instance, instance_id).deleted = True
    db.run_transaction(work)


def instance_row(instance_id: str) -> dict:
    with db.session_scope() as session:
        instance = session.get(Instance, instance_id)
        return {column: getattr(instance, column) for column in INSTANCE_COLUMNS}


def instance_update(instance_id: str, **fields) -> None:
    db.run_transaction(lambda session: crud.instance_update(session, instance_id, fields), retry_for=0)


def backup_create(backup_id: str, instance_id: str, name: str, description: str | None = None) -> None:
    db.run_transaction(
        lambda session: crud.backup_create(session, backup_id, instance_id, name, description), retry_for=0)


def backups_of(instance_id: str) -> list[Backup]:
    with db.session_scope() as session:
        return list(session.scalars(select(Backup).where(Backup.instance_id == instance_id)))


@pytest.fixture
def instance_id(control_plane) -> str:
    return create_instance()


# --- instance_update -----------------------------------------------------------------------

def test_instance_update_sets_every_allowed_field(instance_id):
    fault_at = datetime(2030, 1, 2, 3, 4, 5)
    instance_update(instance_id, task_status="NONE", service_status="running", fault_kind="build_timeout",
                    fault_message="took too long", fault_at=fault_at, host="10.0.0.5", port=5432)
    row = instance_row(instance_id)
    assert {k: row[k] for k in ("task_status", "service_status", "fault_kind", "fault_message",
                                "fault_at", "host", "port")} == {
        "task_status": "NONE", "service_status": "running", "fault_kind": "build_timeout",
        "fault_message": "took too long", "fault_at": fault_at, "host": "10.0.0.5", "port": 5432}


def test_instance_update_clears_fields_with_none(instance_id):
    instance_update(instance_id, service_status="restart required", fault_kind="x", fault_message="y")
    instance_update(instance_id, service_status=None, fault_kind=None, fault_message=None)
    row = instance_row(instance_id)
    assert (row["service_status"], row["fault_kind"], row["fault_message"]) == (None, None, None)


def test_instance_update_without_fields_changes_nothing(instance_id):
    before = instance_row(instance_id)
    instance_update(instance_id)
    assert instance_row(instance_id) == before


@pytest.mark.parametrize("field, value", [
    ("name", "renamed"), ("tenant_id", "other"), ("id", str(uuid.uuid4())), ("deleted", True),
    ("deleted_at", None), ("last_heartbeat", None), ("guest_agent_version", "9"), ("datastore", "postgresql"),
    ("created", None), ("secret", "s"),
])
def test_instance_update_refuses_other_fields_whole(instance_id, field, value):
    before = instance_row(instance_id)
    with pytest.raises(MessageRejected, match="not updatable"):
        instance_update(instance_id, task_status="NONE", **{field: value})
    assert instance_row(instance_id) == before


def test_instance_update_of_missing_or_deleted_instance_is_refused(instance_id):
    with pytest.raises(MessageRejected, match="does not exist"):
        instance_update(str(uuid.uuid4()), task_status="NONE")
    delete_instance(instance_id)
    before = instance_row(instance_id)
    with pytest.raises(MessageRejected, match="does not exist"):
        instance_update(instance_id, task_status="NONE")
    assert instance_row(instance_id) == before


def test_instance_update_accepts_fault_at_as_it_arrives_over_json(instance_id):
    """CRUD tasks travel as JSON, so a time can only arrive as an ISO string."""
    instance_update(instance_id, fault_kind="build_timeout", fault_at="2030-01-02T03:04:05")
    assert instance_row(instance_id)["fault_at"] == datetime(2030, 1, 2, 3, 4, 5)


# --- backup_create -------------------------------------------------------------------------

def test_backup_create_records_a_new_backup(instance_id):
    backup_id = str(uuid.uuid4())
    backup_create(backup_id, instance_id, "nightly", "before upgrade")
    [backup] = backups_of(instance_id)
    assert (backup.id, backup.name, backup.description, backup.state, backup.tenant_id, backup.deleted) == (
        backup_id, "nightly", "before upgrade", "NEW", "tenant-7", False)


def test_backup_create_is_idempotent(instance_id):
    backup_id = str(uuid.uuid4())
    backup_create(backup_id, instance_id, "nightly")
    backup_create(backup_id, instance_id, "nightly")
    backup_create(backup_id, instance_id, "a redelivery never renames")
    [backup] = backups_of(instance_id)
    assert (backup.id, backup.name) == (backup_id, "nightly")
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Backup)) == 1


def test_backup_create_for_missing_or_deleted_instance_is_refused(instance_id):
    with pytest.raises(MessageRejected, match="does not exist"):
        backup_create(str(uuid.uuid4()), str(uuid.uuid4()), "orphan")
    delete_instance(instance_id)
    with pytest.raises(MessageRejected, match="does not exist"):
        backup_create(str(uuid.uuid4()), instance_id, "late")
    assert backups_of(instance_id) == []
