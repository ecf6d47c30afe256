"""Backup rules on a real database (workers.conductor.backups): what a guest reports
(conductor.update_backup) and what the control plane asks (create, delete, fail, deleted)."""

import time
import uuid
from datetime import datetime

import pytest
from sqlalchemy import func, select

from dbaas import db
from dbaas.errors import Conflict, InvalidRequest, NotFound
from dbaas.models import Backup, Instance, Watermark
from workers.conductor import backups, ordering
from workers.conductor.messages import BackupUpdate, MessageRejected

NOW = datetime(2030, 1, 1, 12, 0, 0)
BACKUP_COLUMNS = ("instance_id", "tenant_id", "name", "description", "state", "size", "checksum",
                  "location", "backup_type", "fail_reason", "updated", "deleted")


def create_instance(name: str = "db") -> str:
    def work(session):
        instance = Instance(name=name, tenant_id="tenant-1", task_status="NONE")
        session.add(instance)
        session.flush()
        return instance.id
    return db.run_transaction(work)


def create_backup(instance_id: str, state: str = "NEW", tenant_id: str = "tenant-1", **extra) -> str:
    def work(session):
        backup = Backup(instance_id=instance_id, tenant_id=tenant_id, name="nightly", state=state,
                        updated=datetime(2029, 1, 1), **extra)
        session.add(backup)
        session.flush()
        return backup.id
    return db.run_transaction(work)


@pytest.fixture
def owned(control_plane) -> tuple[str, str]:
    """(instance id, id of a NEW backup of that instance)."""
    instance_id = create_instance()
    return instance_id, create_backup(instance_id)


def update(instance_id: str, backup_id: str, sent: float, **fields) -> bool:
    """Apply one update in its own transaction, as the conductor task does."""
    change = BackupUpdate(instance_id=instance_id, backup_id=backup_id, sent=float(sent), fields=fields)
    return db.run_transaction(lambda session: backups.apply_update(session, change, NOW), retry_for=0)


def refused(instance_id: str, backup_id: str, sent: float, match=None, **fields) -> None:
    with pytest.raises(MessageRejected, match=match):
        update(instance_id, backup_id, sent, **fields)


def backup_row(backup_id: str) -> dict:
    with db.session_scope() as session:
        backup = session.get(Backup, backup_id)
        return {column: getattr(backup, column) for column in BACKUP_COLUMNS}


def watermark(backup_id: str) -> float | None:
    with db.session_scope() as session:
        mark = session.get(Watermark, (ordering.BACKUP, backup_id))
        return mark.sent if mark else None


def states_through(instance_id: str, backup_id: str, *states: str) -> None:
    for sent, state in enumerate(states, start=1):
        assert update(instance_id, backup_id, sent, state=state) is True


# --- forward-only states -------------------------------------------------------------------

def test_full_forward_path(owned):
    instance_id, backup_id = owned
    states_through(instance_id, backup_id, "BUILDING", "SAVING")
    assert update(instance_id, backup_id, 10, state="COMPLETED", size=2.5, checksum="sha256=ab",
                  location="file:///b/1", backup_type="full") is True
    row = backup_row(backup_id)
    assert (row["state"], row["size"], row["checksum"], row["location"], row["backup_type"], row["updated"]) == (
        "COMPLETED", 2.5, "sha256=ab", "file:///b/1", "full", NOW)
    assert watermark(backup_id) == 10


@pytest.mark.parametrize("path", [
    ["BUILDING", "COMPLETED"], ["FAILED"], ["BUILDING", "FAILED"], ["SAVING"], ["COMPLETED"],
    ["BUILDING", "BUILDING"], ["NEW", "BUILDING"],
], ids="->".join)
def test_allowed_transitions(owned, path):
    instance_id, backup_id = owned
    states_through(instance_id, backup_id, *path)
    assert backup_row(backup_id)["state"] == path[-1]


def test_same_state_with_new_size_is_allowed(owned):
    instance_id, backup_id = owned
    update(instance_id, backup_id, 1, state="BUILDING", size=1.0)
    assert update(instance_id, backup_id, 2, state="BUILDING", size=5.0) is True
    assert update(instance_id, backup_id, 3, size=7.0) is True
    assert (backup_row(backup_id)["state"], backup_row(backup_id)["size"]) == ("BUILDING", 7.0)


@pytest.mark.parametrize("path, backwards", [
    (["BUILDING"], "NEW"), (["SAVING"], "BUILDING"), (["BUILDING", "SAVING"], "NEW"),
], ids=lambda v: "->".join(v) if isinstance(v, list) else v)
def test_backward_transition_is_refused(owned, path, backwards):
    instance_id, backup_id = owned
    states_through(instance_id, backup_id, *path)
    before = backup_row(backup_id)
    refused(instance_id, backup_id, 100, state=backwards, size=9.0, match="may not move")
    assert backup_row(backup_id) == before


@pytest.mark.parametrize("final", ["COMPLETED", "FAILED"])
def test_nothing_changes_after_a_final_state(owned, final):
    instance_id, backup_id = owned
    states_through(instance_id, backup_id, "BUILDING", final)
    before = backup_row(backup_id)
    for sent, fields in enumerate([{"state": "BUILDING"}, {"state": "NEW"}, {"state": "COMPLETED"},
                                   {"state": "FAILED"}, {"size": 1.0}, {"checksum": "other"}], start=100):
        refused(instance_id, backup_id, sent, match="already", **fields)
    assert backup_row(backup_id) == before
    assert watermark(backup_id) == 2


def test_refused_transition_does_not_advance_the_watermark(owned):
    instance_id, backup_id = owned
    states_through(instance_id, backup_id, "BUILDING", "SAVING")   # watermark 2
    refused(instance_id, backup_id, 9, state="NEW")
    assert watermark(backup_id) == 2
    assert update(instance_id, backup_id, 5, state="COMPLETED") is True


# --- ordering ------------------------------------------------------------------------------

@pytest.mark.parametrize("sent", [5, 4.999, 1])
def test_stale_update_returns_false_and_changes_nothing(owned, sent):
    instance_id, backup_id = owned
    assert update(instance_id, backup_id, 5, state="BUILDING", size=1.0) is True
    before = backup_row(backup_id)
    assert update(instance_id, backup_id, sent, state="SAVING", size=2.0) is False
    assert backup_row(backup_id) == before
    assert watermark(backup_id) == 5


def test_stale_redelivery_after_completion_is_not_an_error(owned):
    instance_id, backup_id = owned
    states_through(instance_id, backup_id, "BUILDING", "COMPLETED")
    assert update(instance_id, backup_id, 2, state="COMPLETED") is False


def test_ordering_is_per_backup(owned):
    instance_id, first = owned
    second = create_backup(instance_id)
    assert update(instance_id, first, 50, state="BUILDING") is True
    assert update(instance_id, second, 1, state="BUILDING") is True
    assert (watermark(first), watermark(second)) == (50, 1)


# --- ownership and existence ---------------------------------------------------------------

def test_backup_of_another_instance_is_refused(owned):
    instance_id, backup_id = owned
    intruder = create_instance("intruder")
    before = backup_row(backup_id)
    refused(intruder, backup_id, 100, match="does not belong", state="COMPLETED", location="evil://x")
    assert backup_row(backup_id) == before
    assert watermark(backup_id) is None
    # The refused message's `sent` did not block the owner's older, valid one.
    assert update(instance_id, backup_id, 50, state="BUILDING") is True
    assert backup_row(backup_id)["state"] == "BUILDING"


@pytest.mark.parametrize("which", ["missing", "deleted"])
def test_unknown_or_deleted_backup_is_refused(owned, which):
    instance_id, _ = owned
    target = str(uuid.uuid4()) if which == "missing" else create_backup(instance_id, deleted=True)
    refused(instance_id, target, 1, match="does not exist", state="BUILDING")
    assert watermark(target) is None


# --- handle_update: parsing plus applying -------------------------------------------

def handle(args, kwargs) -> bool:
    return db.run_transaction(lambda session: backups.handle_update(session, args, kwargs, NOW),
                              retry_for=0)


def test_handle_applies_a_valid_message(owned):
    instance_id, backup_id = owned
    assert handle([instance_id, backup_id, time.time()], {"state": "BUILDING", "size": 3}) is True
    assert (backup_row(backup_id)["state"], backup_row(backup_id)["size"]) == ("BUILDING", 3.0)


def test_handle_stale_message_returns_false(owned):
    instance_id, backup_id = owned
    sent = time.time()
    handle([instance_id, backup_id, sent], {"state": "BUILDING"})
    assert handle([instance_id, backup_id, sent - 1], {"state": "SAVING"}) is False
    assert backup_row(backup_id)["state"] == "BUILDING"


@pytest.mark.parametrize("kwargs", [
    {"state": "COMPLETED", "name": "renamed"}, {"size": 1.0, "tenant_id": "other"},
    {"deleted": True}, {"state": "COMPLETED", "size": "huge"},
], ids=lambda k: ",".join(k))
def test_handle_refused_message_changes_nothing(owned, kwargs):
    instance_id, backup_id = owned
    before = backup_row(backup_id)
    with pytest.raises(MessageRejected):
        handle([instance_id, backup_id, time.time()], kwargs)
    assert backup_row(backup_id) == before
    assert watermark(backup_id) is None


def test_handle_ignores_unknown_fields(owned):
    instance_id, backup_id = owned
    assert handle([instance_id, backup_id, time.time()], {"state": "SAVING", "colour": "blue"}) is True
    assert backup_row(backup_id)["state"] == "SAVING"


# --- what the control plane asks: create, request_delete, fail, deleted --------------------

def run(work, *args, **kwargs):
    return db.run_transaction(lambda session: work(session, *args, **kwargs), retry_for=0)


def active_instance(project: str = "tenant-1", **fields) -> str:
    def work(session):
        instance = Instance(name="db", tenant_id=project, task_status="NONE", service_status="running",
                            **fields)
        session.add(instance)
        session.flush()
        return instance.id
    return db.run_transaction(work)


def backup_count() -> int:
    with db.session_scope() as session:
        return session.scalar(select(func.count()).select_from(Backup))


def test_create_records_a_new_backup_of_an_active_instance(control_plane):
    instance_id, backup_id = active_instance(), str(uuid.uuid4())
    backup, created = run(backups.create, backup_id, instance_id, " nightly ", "before upgrade", "tenant-1")
    assert created and backup.id == backup_id
    assert {k: v for k, v in backup_row(backup_id).items() if k not in ("updated", "size")} == {
        "instance_id": instance_id, "tenant_id": "tenant-1", "name": "nightly",
        "description": "before upgrade", "state": "NEW", "checksum": None, "location": None,
        "backup_type": None, "fail_reason": None, "deleted": False}
    view = backups.view(backup)
    assert (view["id"], view["state"], view["project_id"], view["instance_id"]) == (
        backup_id, "NEW", "tenant-1", instance_id)


def test_create_by_the_operator_takes_the_instances_project(control_plane):
    instance_id, backup_id = active_instance("tenant-9"), str(uuid.uuid4())
    run(backups.create, backup_id, instance_id, "nightly", None, None)
    assert backup_row(backup_id)["tenant_id"] == "tenant-9"


def test_create_is_idempotent_on_the_id(control_plane):
    instance_id, backup_id = active_instance(), str(uuid.uuid4())
    run(backups.create, backup_id, instance_id, "nightly", None, "tenant-1")
    backup, created = run(backups.create, backup_id, instance_id, "a redelivery never renames", None, "tenant-1")
    assert not created and backup.id == backup_id
    assert backup_row(backup_id)["name"] == "nightly" and backup_count() == 1
    # Still the same create once the instance is busy with that very backup.
    def busy(session):
        session.get(Instance, instance_id).task_status = "BACKING_UP"
    db.run_transaction(busy)
    assert run(backups.create, backup_id, instance_id, "nightly", None, "tenant-1")[1] is False


@pytest.mark.parametrize("state", [
    {"task_status": "BUILDING", "service_status": None},
    {"task_status": "NONE", "service_status": None},
    {"task_status": "REBOOTING", "service_status": "running"},
    {"task_status": "DELETING", "service_status": "running"},
    {"task_status": "BACKING_UP", "service_status": "running"},
    {"task_status": "NONE", "service_status": "shutdown"},
    {"task_status": "NONE", "service_status": "crashed"},
    {"task_status": "NONE", "service_status": "running", "fault_kind": "heartbeat_expired"},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_create_only_of_an_active_instance(control_plane, state):
    instance_id = active_instance(**{k: v for k, v in state.items() if k not in ("task_status", "service_status")})

    def work(session):
        instance = session.get(Instance, instance_id)
        instance.task_status, instance.service_status = state["task_status"], state["service_status"]
    db.run_transaction(work)
    with pytest.raises(Conflict, match="only an ACTIVE instance"):
        run(backups.create, str(uuid.uuid4()), instance_id, "nightly", None, "tenant-1")
    assert backup_count() == 0


def test_create_for_another_projects_missing_or_deleted_instance_is_not_found(control_plane):
    instance_id = active_instance()
    with pytest.raises(NotFound):
        run(backups.create, str(uuid.uuid4()), instance_id, "x", None, "tenant-2")
    with pytest.raises(NotFound):
        run(backups.create, str(uuid.uuid4()), str(uuid.uuid4()), "orphan", None, None)

    def delete(session):
        session.get(Instance, instance_id).deleted = True
    db.run_transaction(delete)
    with pytest.raises(NotFound):
        run(backups.create, str(uuid.uuid4()), instance_id, "late", None, None)
    assert backup_count() == 0


@pytest.mark.parametrize("taken_by", ["another project", "a deleted backup"])
def test_create_with_an_id_taken_otherwise_is_a_conflict(control_plane, taken_by):
    backup_id = create_backup(active_instance(), deleted=taken_by == "a deleted backup")
    project = "tenant-2" if taken_by == "another project" else "tenant-1"
    instance_id = active_instance(project)
    before = backup_row(backup_id)
    with pytest.raises(Conflict, match="taken"):
        run(backups.create, backup_id, instance_id, "mine now", None, project)
    assert backup_row(backup_id) == before and backup_count() == 1


@pytest.mark.parametrize("name, description", [
    ("", None), ("  ", None), ("x" * 256, None), (None, None), (3, None),
    ("ok", "d" * 2001), ("ok", 5), ("ok", ["d"]),
], ids=lambda v: repr(v)[:12])
def test_create_refuses_bad_names_and_descriptions(control_plane, name, description):
    instance_id = active_instance()
    with pytest.raises(InvalidRequest):
        run(backups.create, str(uuid.uuid4()), instance_id, name, description, "tenant-1")
    assert backup_count() == 0


def test_get_and_listing_see_only_the_projects_live_backups(control_plane):
    mine, theirs = active_instance(), active_instance("tenant-2")
    first, second = create_backup(mine), create_backup(mine)
    other = create_backup(theirs, tenant_id="tenant-2")
    create_backup(mine, deleted=True)
    assert run(backups.get, first, "tenant-1").id == first
    with pytest.raises(NotFound):
        run(backups.get, other, "tenant-1")
    with pytest.raises(NotFound):
        run(backups.get, str(uuid.uuid4()))

    def ids(project=None, instance_id=None):
        return run(lambda session: sorted(b.id for b in backups.listing(session, project, instance_id)))
    assert ids("tenant-1") == sorted([first, second])
    assert ids("tenant-2") == [other]
    assert ids(None) == sorted([first, second, other])
    assert ids(None, theirs) == [other]
    assert ids("tenant-1", theirs) == []


@pytest.mark.parametrize("state", ["NEW", "BUILDING", "SAVING"])
def test_delete_is_refused_while_in_progress(control_plane, state):
    backup_id = create_backup(active_instance(), state=state)
    before = backup_row(backup_id)
    with pytest.raises(Conflict, match=state):
        run(backups.request_delete, backup_id, "tenant-1")
    assert backup_row(backup_id) == before


@pytest.mark.parametrize("state", ["COMPLETED", "FAILED"])
def test_delete_request_of_a_finished_backup_leaves_the_record_to_deleted(control_plane, state):
    backup_id = create_backup(active_instance(), state=state, location="file:///b/x")
    before = backup_row(backup_id)
    assert run(backups.request_delete, backup_id, "tenant-1").id == backup_id
    assert backup_row(backup_id) == before  # the taskmanager removes the file, then reports


def test_delete_request_of_another_projects_backup_is_not_found(control_plane):
    backup_id = create_backup(active_instance(), state="COMPLETED")
    with pytest.raises(NotFound):
        run(backups.request_delete, backup_id, "tenant-2")


def test_deleted_ends_the_record_idempotently(owned):
    _instance_id, backup_id = owned
    run(backups.deleted, backup_id, NOW)
    run(backups.deleted, backup_id, datetime(2031, 1, 1))  # a redelivery
    with db.session_scope() as session:
        backup = session.get(Backup, backup_id)
        assert (backup.deleted, backup.deleted_at) == (True, NOW)
    with pytest.raises(NotFound):
        run(backups.get, backup_id)
    with pytest.raises(NotFound):
        run(backups.deleted, str(uuid.uuid4()), NOW)


@pytest.mark.parametrize("state", ["NEW", "BUILDING", "SAVING"])
def test_fail_ends_an_unfinished_backup(control_plane, state):
    backup_id = create_backup(active_instance(), state=state)
    run(backups.fail, backup_id, "no guest agent runs" + "!" * 3000, NOW)
    row = backup_row(backup_id)
    assert (row["state"], row["updated"]) == ("FAILED", NOW)
    assert row["fail_reason"].startswith("no guest agent runs") and len(row["fail_reason"]) == 2000


@pytest.mark.parametrize("state", ["COMPLETED", "FAILED"])
def test_fail_leaves_a_final_state(control_plane, state):
    backup_id = create_backup(active_instance(), state=state, fail_reason="first")
    before = backup_row(backup_id)
    run(backups.fail, backup_id, "too late", NOW)
    assert backup_row(backup_id) == before


def test_fail_of_an_unknown_backup_is_not_found(control_plane):
    with pytest.raises(NotFound):
        run(backups.fail, str(uuid.uuid4()), "why", NOW)


def test_a_failed_backup_refuses_later_guest_reports(owned):
    instance_id, backup_id = owned
    run(backups.fail, backup_id, "gave up", NOW)
    refused(instance_id, backup_id, time.time(), match="already FAILED", state="COMPLETED")


# --- restore_source: which backup a new instance may start from ----------------------------

def completed_backup(project: str = "tenant-1", datastore: str = "postgresql") -> str:
    instance_id = active_instance(project, datastore=datastore)
    return create_backup(instance_id, state="COMPLETED", tenant_id=project, location=f"file:///b/{uuid.uuid4()}")


def test_restore_source_is_the_backups_datastore_and_location(control_plane):
    backup_id = completed_backup()
    location = backup_row(backup_id)["location"]
    assert run(backups.restore_source, backup_id, None, "tenant-1") == ("postgresql", "15", location)
    assert run(backups.restore_source, backup_id, "postgresql", "tenant-1") == ("postgresql", "15", location)
    assert run(backups.restore_source, backup_id, "postgresql", "tenant-1", version="15") == (
        "postgresql", "15", location)


def test_restore_source_of_another_version_is_invalid(control_plane):
    with pytest.raises(InvalidRequest, match="postgresql 15, not 9"):
        run(backups.restore_source, completed_backup(), None, "tenant-1", version="9")


def test_restore_source_of_another_datastore_is_invalid(control_plane):
    with pytest.raises(InvalidRequest, match="postgresql instance, not sqlite"):
        run(backups.restore_source, completed_backup(), "sqlite", "tenant-1")


@pytest.mark.parametrize("state, location", [
    ("NEW", None), ("BUILDING", None), ("SAVING", None), ("FAILED", None), ("COMPLETED", None),
    ("FAILED", "file:///b/partial"),
])
def test_restore_source_must_be_completed_with_a_location(control_plane, state, location):
    backup_id = create_backup(active_instance(), state=state, location=location)
    with pytest.raises(Conflict, match="only a COMPLETED backup"):
        run(backups.restore_source, backup_id, None, "tenant-1")


def test_restore_source_of_another_project_or_deleted_is_not_found(control_plane):
    backup_id = completed_backup()
    with pytest.raises(NotFound):
        run(backups.restore_source, backup_id, None, "tenant-2")
    run(backups.deleted, backup_id, NOW)
    with pytest.raises(NotFound):
        run(backups.restore_source, backup_id, None, "tenant-1")
