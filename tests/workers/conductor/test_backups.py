"""conductor.update_backup on a real database: workers.conductor.backups."""

import time
import uuid
from datetime import datetime

import pytest

from dbaas import db
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


def create_backup(instance_id: str, state: str = "NEW", **extra) -> str:
    def work(session):
        backup = Backup(instance_id=instance_id, tenant_id="tenant-1", name="nightly", state=state,
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
    return db.run_transaction(lambda session: backups.apply_backup_update(session, change, NOW), retry_for=0)


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


# --- handle_backup_update: parsing plus applying -------------------------------------------

def handle(args, kwargs) -> bool:
    return db.run_transaction(lambda session: backups.handle_backup_update(session, args, kwargs, NOW),
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
