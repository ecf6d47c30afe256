"""Instance rules on a real database: workers.conductor.instances (plain functions taking a
session and primitives). What the manager adds on top — ids, restores, the taskmanager's
casts — is in test_manager.py."""

import uuid
from datetime import datetime

import pytest
from sqlalchemy import func, select

from dbaas import db
from dbaas.errors import Conflict, InvalidRequest, NotFound
from dbaas.models import Backup, Instance
from workers.conductor import auth, instances

INSTANCE_COLUMNS = ("name", "tenant_id", "datastore", "task_status", "service_status", "fault_kind",
                    "fault_message", "fault_at", "host", "port", "last_heartbeat",
                    "guest_agent_version", "deleted", "deleted_at", "credential_generation")


def run(work, *args, **kwargs):
    """``work(session, *args, **kwargs)`` in one transaction, as a conductor task runs it."""
    return db.run_transaction(lambda session: work(session, *args, **kwargs), retry_for=0)


def create(name: str = "db", datastore: str | None = None, project_id: str = "tenant-7",
           instance_id: str | None = None) -> str:
    instance_id = instance_id or str(uuid.uuid4())
    instance, created = run(instances.create, instance_id, name, datastore, project_id)
    assert created and instance.id == instance_id
    return instance_id


def set_fields(instance_id: str, **fields) -> None:
    def work(session):
        instance = session.get(Instance, instance_id)
        for name, value in fields.items():
            setattr(instance, name, value)
    db.run_transaction(work)


def instance_row(instance_id: str) -> dict:
    with db.session_scope() as session:
        instance = session.get(Instance, instance_id)
        return {column: getattr(instance, column) for column in INSTANCE_COLUMNS}


def count() -> int:
    with db.session_scope() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def update(instance_id: str, **fields) -> None:
    run(instances.update, instance_id, fields)


@pytest.fixture
def instance_id(control_plane) -> str:
    return create()


# --- create --------------------------------------------------------------------------------

def test_create_records_an_instance_in_build(control_plane):
    instance_id = str(uuid.uuid4())
    instance, created = run(instances.create, instance_id, "  orders  ", None, "tenant-7")
    assert created
    row = instance_row(instance_id)
    assert (row["name"], row["tenant_id"], row["datastore"], row["task_status"], row["deleted"],
            row["credential_generation"]) == ("orders", "tenant-7", "sqlite", "BUILDING", False, 1)
    view = instances.view(instance)
    assert (view["id"], view["status"], view["project_id"], view["fault"]) == (instance_id, "BUILD", "tenant-7", None)


def test_create_with_a_known_datastore(control_plane):
    assert instance_row(create(datastore="postgresql"))["datastore"] == "postgresql"


def test_create_is_idempotent_on_the_id(instance_id):
    instance, created = run(instances.create, instance_id, "a redelivery never renames", "postgresql",
                            "tenant-7")
    assert not created and instance.id == instance_id
    assert (instance_row(instance_id)["name"], instance_row(instance_id)["datastore"]) == ("db", "sqlite")
    assert count() == 1


@pytest.mark.parametrize("taken_by", ["another project", "a deleted instance"])
def test_create_with_an_id_taken_otherwise_is_a_conflict(instance_id, taken_by):
    project = "tenant-7"
    if taken_by == "another project":
        project = "tenant-8"
    else:
        set_fields(instance_id, deleted=True)
    before = instance_row(instance_id)
    with pytest.raises(Conflict, match="taken"):
        run(instances.create, instance_id, "db", None, project)
    assert instance_row(instance_id) == before and count() == 1


@pytest.mark.parametrize("name", ["", "   ", "x" * 256, "a\nb", "nul\x00", None, 5, ["db"], {"n": 1}],
                         ids=lambda n: repr(n)[:12])
def test_create_refuses_a_bad_name(control_plane, name):
    with pytest.raises(InvalidRequest, match="name"):
        run(instances.create, str(uuid.uuid4()), name, None, "tenant-7")
    assert count() == 0


def test_create_accepts_the_longest_name(control_plane):
    assert instance_row(create(name="x" * 255))["name"] == "x" * 255


@pytest.mark.parametrize("datastore", ["mysql", "SQLITE", "sqlite ", 7, ["sqlite"], {"type": "sqlite"}],
                         ids=repr)
def test_create_refuses_an_unknown_datastore(control_plane, datastore):
    with pytest.raises(InvalidRequest, match="datastore"):
        run(instances.create, str(uuid.uuid4()), "db", datastore, "tenant-7")
    assert count() == 0


# --- get and listing -----------------------------------------------------------------------

def test_get_sees_only_live_instances_of_the_project(instance_id):
    assert run(instances.get, instance_id, "tenant-7").id == instance_id
    assert run(instances.get, instance_id).id == instance_id  # None: every project (the operator)
    with pytest.raises(NotFound) as other_project:
        run(instances.get, instance_id, "tenant-8")
    missing_id = str(uuid.uuid4())
    with pytest.raises(NotFound) as missing:
        run(instances.get, missing_id, "tenant-8")
    # Another project's instance reads exactly like a missing one.
    assert str(other_project.value).replace(instance_id, "ID") == str(missing.value).replace(missing_id, "ID")
    set_fields(instance_id, deleted=True)
    with pytest.raises(NotFound):
        run(instances.get, instance_id)


@pytest.mark.parametrize("bad_id", [None, 5, ["x"], "x" * 65, ""], ids=repr)
def test_get_with_a_malformed_id_is_not_found(control_plane, bad_id):
    with pytest.raises(NotFound):
        run(instances.get, bad_id)


def test_listing_is_per_project_and_live_only(control_plane):
    first, second = create("a"), create("b")
    other = create("c", project_id="tenant-8")
    gone = create("d")
    set_fields(gone, deleted=True)
    set_fields(first, created=datetime(2030, 1, 1))
    set_fields(second, created=datetime(2029, 1, 1))

    def ids(project):
        return run(lambda session: [i.id for i in instances.listing(session, project)])
    assert ids("tenant-7") == [second, first]  # oldest first
    assert ids("tenant-8") == [other]
    assert ids("nobody") == []
    assert sorted(ids(None)) == sorted([first, second, other])


# --- delete: requested, then done ----------------------------------------------------------

def test_request_delete_marks_deleting(instance_id):
    instance = run(instances.request_delete, instance_id, "tenant-7")
    assert instances.view(instance)["status"] == "SHUTDOWN"
    row = instance_row(instance_id)
    assert (row["task_status"], row["deleted"]) == ("DELETING", False)
    run(instances.request_delete, instance_id)  # asked again: still DELETING
    assert instance_row(instance_id)["task_status"] == "DELETING"


def test_request_delete_fails_the_backups_still_running(instance_id):
    def add(session, state):
        backup = Backup(instance_id=instance_id, name=state, state=state)
        session.add(backup)
        session.flush()
        return backup.id
    ids = {state: run(add, state) for state in ("NEW", "BUILDING", "SAVING", "COMPLETED", "FAILED")}
    run(instances.request_delete, instance_id)

    def states(session):
        return {b.name: (b.state, b.fail_reason) for b in session.scalars(
            select(Backup).where(Backup.id.in_(ids.values())))}
    after = run(states)
    for running in ("NEW", "BUILDING", "SAVING"):
        assert after[running] == ("FAILED", "the instance was deleted")
    assert after["COMPLETED"] == ("COMPLETED", None) and after["FAILED"][0] == "FAILED"


def test_request_delete_of_another_projects_instance_is_not_found(instance_id):
    before = instance_row(instance_id)
    with pytest.raises(NotFound):
        run(instances.request_delete, instance_id, "tenant-8")
    assert instance_row(instance_id) == before


def test_deleted_ends_the_record_and_its_credentials(instance_id):
    live = auth.LiveCredentials(ttl=0)
    assert run(lambda session: live.generations(session, {instance_id})) == {instance_id: 1}
    run(instances.request_delete, instance_id)
    now = datetime(2030, 5, 5)
    run(instances.deleted, instance_id, now)
    row = instance_row(instance_id)
    assert (row["deleted"], row["deleted_at"], row["task_status"]) == (True, now, "NONE")
    assert run(lambda session: live.generations(session, {instance_id})) == {instance_id: None}
    with pytest.raises(NotFound):
        run(instances.get, instance_id)


def test_deleted_is_idempotent(instance_id):
    run(instances.deleted, instance_id, datetime(2030, 5, 5))
    run(instances.deleted, instance_id, datetime(2031, 1, 1))  # a redelivery
    assert instance_row(instance_id)["deleted_at"] == datetime(2030, 5, 5)


def test_deleted_of_an_unknown_instance_is_not_found(control_plane):
    with pytest.raises(NotFound):
        run(instances.deleted, str(uuid.uuid4()), datetime(2030, 5, 5))


# --- reset_status --------------------------------------------------------------------------

def test_reset_status_clears_fault_task_and_sticky_status(instance_id):
    set_fields(instance_id, fault_kind="build_timeout", fault_message="too slow", fault_at=datetime(2030, 1, 1),
               task_status="REBOOTING", service_status="restart required")
    instance, cleared = run(instances.reset_status, instance_id)
    assert len(cleared) == 3 and "build_timeout" in cleared[0] and "REBOOTING" in cleared[1]
    assert "restart required" in cleared[2]
    row = instance_row(instance_id)
    assert (row["fault_kind"], row["fault_message"], row["fault_at"], row["task_status"], row["service_status"]) == (
        None, None, None, "NONE", None)
    assert instances.view(instance)["status"] == "BUILD"  # until a heartbeat says more


def test_reset_status_leaves_a_reported_status_and_clears_nothing_twice(instance_id):
    set_fields(instance_id, task_status="NONE", service_status="running")
    instance, cleared = run(instances.reset_status, instance_id)
    assert cleared == [] and instances.view(instance)["status"] == "ACTIVE"
    assert instance_row(instance_id)["service_status"] == "running"


def test_reset_status_of_a_deleted_instance_is_not_found(instance_id):
    set_fields(instance_id, deleted=True)
    with pytest.raises(NotFound):
        run(instances.reset_status, instance_id)


# --- update (conductor.instance_update, cast by the taskmanager) ---------------------------

def test_update_sets_every_allowed_field(instance_id):
    update(instance_id, task_status="NONE", service_status="running", fault_kind="build_timeout",
           fault_message="took too long", fault_at="2030-01-02T03:04:05", host="10.0.0.5", port=5432)
    row = instance_row(instance_id)
    assert {k: row[k] for k in ("task_status", "service_status", "fault_kind", "fault_message",
                                "fault_at", "host", "port")} == {
        "task_status": "NONE", "service_status": "running", "fault_kind": "build_timeout",
        "fault_message": "took too long", "fault_at": datetime(2030, 1, 2, 3, 4, 5), "host": "10.0.0.5",
        "port": 5432}


def test_update_clears_fields_with_none(instance_id):
    update(instance_id, service_status="restart required", fault_kind="x", fault_message="y")
    update(instance_id, service_status=None, fault_kind=None, fault_message=None)
    row = instance_row(instance_id)
    assert (row["service_status"], row["fault_kind"], row["fault_message"]) == (None, None, None)


def test_update_without_fields_changes_nothing(instance_id):
    before = instance_row(instance_id)
    update(instance_id)
    assert instance_row(instance_id) == before


@pytest.mark.parametrize("field, value", [
    ("name", "renamed"), ("tenant_id", "other"), ("id", str(uuid.uuid4())), ("deleted", True),
    ("deleted_at", None), ("last_heartbeat", None), ("guest_agent_version", "9"), ("datastore", "postgresql"),
    ("created", None), ("secret", "s"), ("credential_generation", 2),
])
def test_update_refuses_other_fields_whole(instance_id, field, value):
    before = instance_row(instance_id)
    with pytest.raises(InvalidRequest, match="not updatable"):
        update(instance_id, task_status="NONE", **{field: value})
    assert instance_row(instance_id) == before


@pytest.mark.parametrize("field, value", [
    ("service_status", "potato"), ("service_status", "RUNNING"), ("service_status", 1),
    ("port", 0), ("port", 65536), ("port", "5432"), ("port", True), ("port", 5432.0),
    ("fault_at", "yesterday"), ("fault_at", 1700000000), ("task_status", "T" * 33), ("task_status", 3),
    ("host", "h" * 256), ("fault_message", ["x"]),
], ids=lambda v: repr(v)[:16])
def test_update_refuses_bad_values_whole(instance_id, field, value):
    before = instance_row(instance_id)
    with pytest.raises(InvalidRequest, match=field):
        update(instance_id, **{"host": "10.0.0.5", field: value})  # valid fields do not go through either
    assert instance_row(instance_id) == before


def test_update_of_missing_or_deleted_instance_is_not_found(instance_id):
    with pytest.raises(NotFound):
        update(str(uuid.uuid4()), task_status="NONE")
    set_fields(instance_id, deleted=True)
    before = instance_row(instance_id)
    with pytest.raises(NotFound):
        update(instance_id, task_status="NONE")
    assert instance_row(instance_id) == before


def test_update_takes_fault_at_as_it_arrives_over_json(instance_id):
    """Casts travel as JSON, so a time can only arrive as an ISO string; one with a zone is
    stored as naive UTC like every time."""
    update(instance_id, fault_kind="build_timeout", fault_at="2030-01-02T03:04:05")
    assert instance_row(instance_id)["fault_at"] == datetime(2030, 1, 2, 3, 4, 5)
    update(instance_id, fault_at="2030-01-02T05:04:05+02:00")
    assert instance_row(instance_id)["fault_at"] == datetime(2030, 1, 2, 3, 4, 5)
