"""The conductor's calls and casts as plain functions (workers.conductor.manager) on a real
database: what each answers, what it records, and the work it hands the taskmanager —
which is only registered in the transaction and sent once it committed.

The taskmanager is replaced at the edge (``manager.taskmanager()``) by a recorder.
"""

import uuid

import pytest
from sqlalchemy import func, select

from dbaas import db, settings, signing
from dbaas.db import _AFTER_COMMIT
from dbaas.errors import Conflict, InvalidRequest, NotFound
from dbaas.models import Backup, Instance
from workers.conductor import instances, manager


class Taskmanager:
    """Records the casts the conductor hands the taskmanager."""

    def __init__(self):
        self.sent: list[tuple] = []

    def __getattr__(self, name):
        if name not in ("create_instance", "delete_instance", "restart_instance", "create_backup",
                        "delete_backup", "reset_password"):
            raise AttributeError(name)
        return lambda *args: self.sent.append((name, *args))


@pytest.fixture
def taskmanager(control_plane, monkeypatch) -> Taskmanager:
    recorder = Taskmanager()
    monkeypatch.setattr(manager, "taskmanager", lambda: recorder)
    return recorder


def call(function, *args, **kwargs):
    """One call or cast as the conductor's task runs it: one transaction, then its casts."""
    return db.run_transaction(lambda session: function(session, *args, **kwargs), retry_for=0)


def new_id() -> str:
    return str(uuid.uuid4())


def create(taskmanager, name="db", project_id="p1", **kwargs) -> dict:
    view = call(manager.instance_create, new_id(), name, project_id=project_id, **kwargs)
    taskmanager.sent.clear()
    return view


def make_active(instance_id: str) -> None:
    """What the guest's first heartbeat does."""
    call(manager.instance_update, instance_id, {"task_status": "NONE", "service_status": "running"})


def count(model) -> int:
    with db.session_scope() as session:
        return session.scalar(select(func.count()).select_from(model))


def row(model, object_id):
    with db.session_scope() as session:
        return session.get(model, object_id)


BAD_IDS = ["not-a-uuid", "", None, 5, ["x"], str(uuid.uuid4()).upper(), str(uuid.uuid4()).replace("-", ""),
           "{" + str(uuid.uuid4()) + "}", str(uuid.uuid4()) + " "]


# --- instance_create -----------------------------------------------------------------------

def test_create_answers_the_new_record_and_hands_it_over_after_commit(taskmanager):
    instance_id = new_id()
    view = call(manager.instance_create, instance_id, "orders", datastore="postgresql", project_id="p1")
    assert (view["id"], view["name"], view["status"], view["datastore"], view["project_id"]) == (
        instance_id, "orders", "BUILD", "postgresql", "p1")
    assert taskmanager.sent == [("create_instance", instance_id, "postgresql", None, 1)]
    assert row(Instance, instance_id).task_status == "BUILDING"


def test_create_without_a_project_is_in_the_default_project(taskmanager):
    view = call(manager.instance_create, new_id(), "db")
    assert view["project_id"] == instances.DEFAULT_PROJECT == "default"
    assert view["datastore"] == "sqlite"


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_create_needs_a_canonical_uuid(taskmanager, bad_id):
    with pytest.raises(InvalidRequest, match="canonical UUID"):
        call(manager.instance_create, bad_id, "db")
    assert count(Instance) == 0 and taskmanager.sent == []


@pytest.mark.parametrize("name, datastore", [("", None), ("x" * 256, None), (None, None), ("db", "mysql"),
                                              ("db", ["sqlite"])], ids=repr)
def test_create_refuses_bad_requests_and_records_nothing(taskmanager, name, datastore):
    with pytest.raises(InvalidRequest):
        call(manager.instance_create, new_id(), name, datastore=datastore)
    assert count(Instance) == 0 and taskmanager.sent == []


def test_create_is_idempotent_on_the_id(taskmanager):
    instance_id = new_id()
    first = call(manager.instance_create, instance_id, "db", project_id="p1")
    again = call(manager.instance_create, instance_id, "db", project_id="p1")
    assert again["id"] == first["id"] and again["name"] == "db" and count(Instance) == 1
    # Handed over again (the taskmanager's create is idempotent): never handing it over
    # would be worse than twice.
    assert taskmanager.sent == [("create_instance", instance_id, "sqlite", None, 1)] * 2


def test_create_again_once_building_ended_hands_nothing_over(taskmanager):
    instance_id = create(taskmanager)["id"]
    make_active(instance_id)
    assert call(manager.instance_create, instance_id, "db", project_id="p1")["status"] == "ACTIVE"
    assert taskmanager.sent == []


def test_create_with_another_projects_id_is_a_conflict(taskmanager):
    instance_id = create(taskmanager, project_id="p1")["id"]
    with pytest.raises(Conflict):
        call(manager.instance_create, instance_id, "mine", project_id="p2")
    assert row(Instance, instance_id).tenant_id == "p1" and taskmanager.sent == []


# --- restore -------------------------------------------------------------------------------

def completed_backup(taskmanager, project_id="p1", datastore="postgresql") -> str:
    instance_id = create(taskmanager, project_id=project_id, datastore=datastore)["id"]
    make_active(instance_id)
    backup_id = call(manager.backup_create, new_id(), instance_id, "nightly", project_id=project_id)["id"]

    def complete(session):
        backup = session.get(Backup, backup_id)
        backup.state, backup.location = "COMPLETED", f"file:///backups/{backup_id}"
    db.run_transaction(complete)
    taskmanager.sent.clear()
    return backup_id


def test_restore_takes_the_backups_datastore_and_hands_over_its_location(taskmanager):
    backup_id = completed_backup(taskmanager)
    instance_id = new_id()
    view = call(manager.instance_create, instance_id, "restored", restore_from=backup_id, project_id="p1")
    assert (view["datastore"], view["status"]) == ("postgresql", "BUILD")
    assert taskmanager.sent == [("create_instance", instance_id, "postgresql",
                                 f"file:///backups/{backup_id}", 1)]


def test_restore_into_another_datastore_is_invalid(taskmanager):
    backup_id = completed_backup(taskmanager)
    with pytest.raises(InvalidRequest, match="not sqlite"):
        call(manager.instance_create, new_id(), "restored", datastore="sqlite", restore_from=backup_id,
             project_id="p1")
    assert taskmanager.sent == []


def test_restore_from_an_unfinished_backup_is_a_conflict(taskmanager):
    instance_id = create(taskmanager)["id"]
    make_active(instance_id)
    backup_id = call(manager.backup_create, new_id(), instance_id, "nightly", project_id="p1")["id"]
    taskmanager.sent.clear()
    with pytest.raises(Conflict, match="COMPLETED"):
        call(manager.instance_create, new_id(), "restored", restore_from=backup_id, project_id="p1")
    assert count(Instance) == 1 and taskmanager.sent == []


@pytest.mark.parametrize("source", ["another project's", "missing", "deleted", "malformed"])
def test_restore_from_a_backup_the_project_cannot_see_is_not_found(taskmanager, source):
    backup_id = completed_backup(taskmanager, project_id="p2" if source == "another project's" else "p1")
    if source == "missing":
        backup_id = new_id()
    elif source == "deleted":
        call(manager.backup_deleted, backup_id)
    elif source == "malformed":
        backup_id = {"id": backup_id}
    with pytest.raises(NotFound):
        call(manager.instance_create, new_id(), "restored", restore_from=backup_id, project_id="p1")
    assert count(Instance) == 1 and taskmanager.sent == []


# --- show and list: one project never sees another's ---------------------------------------

def test_show_and_list_are_per_project(taskmanager):
    mine, theirs = create(taskmanager, "mine", "p1"), create(taskmanager, "theirs", "p2")
    assert call(manager.instance_show, mine["id"], "p1") == mine
    assert call(manager.instance_show, theirs["id"]) == theirs  # the operator sees everything
    assert [v["id"] for v in call(manager.instance_list, "p1")] == [mine["id"]]
    assert sorted(v["id"] for v in call(manager.instance_list)) == sorted([mine["id"], theirs["id"]])
    assert call(manager.instance_list, "p3") == []


def test_another_projects_instance_reads_exactly_like_a_missing_one(taskmanager):
    theirs, missing = create(taskmanager, project_id="p2")["id"], new_id()
    for function in (manager.instance_show, manager.instance_delete, manager.instance_restart):
        with pytest.raises(NotFound) as other:
            call(function, theirs, "p1")
        with pytest.raises(NotFound) as absent:
            call(function, missing, "p1")
        assert str(other.value).replace(theirs, "ID") == str(absent.value).replace(missing, "ID")
    with pytest.raises(NotFound):
        call(manager.backup_list, "p1", theirs)
    assert row(Instance, theirs).task_status == "BUILDING" and taskmanager.sent == []


def test_views_are_plain_data(taskmanager):
    view = create(taskmanager)
    assert all(isinstance(v, (str, int, type(None), dict)) for v in view.values())
    assert view["created"].endswith("Z") and view["fault"] is None


# --- delete, deleted, restart, reset_status ------------------------------------------------

def test_delete_marks_deleting_and_hands_over_after_commit(taskmanager):
    instance_id = create(taskmanager)["id"]
    view = call(manager.instance_delete, instance_id, "p1")
    assert (view["status"], view["task_status"]) == ("SHUTDOWN", "DELETING")
    assert taskmanager.sent == [("delete_instance", instance_id, 1)]
    assert row(Instance, instance_id).deleted is False  # until the taskmanager reports


def test_deleted_ends_the_instance(taskmanager):
    instance_id = create(taskmanager)["id"]
    call(manager.instance_delete, instance_id, "p1")
    call(manager.instance_deleted, instance_id)
    call(manager.instance_deleted, instance_id)  # a redelivered report
    with pytest.raises(NotFound):
        call(manager.instance_show, instance_id)
    assert call(manager.instance_list) == []
    instance = row(Instance, instance_id)
    assert instance.deleted and instance.deleted_at is not None
    with pytest.raises(NotFound):
        call(manager.instance_deleted, new_id())


def test_restart_hands_over_with_the_credentials_generation(taskmanager):
    instance_id = create(taskmanager)["id"]
    make_active(instance_id)
    view = call(manager.instance_restart, instance_id, "p1")
    assert (view["status"], view["task_status"]) == ("REBOOT", "REBOOTING")
    assert taskmanager.sent == [("restart_instance", instance_id, 1, "sqlite")]


def test_restart_clears_a_fault_that_says_the_guest_is_gone(taskmanager):
    gone, failed, building = (create(taskmanager)["id"] for _ in range(3))
    for instance_id in (gone, failed):
        make_active(instance_id)
    call(manager.instance_update, gone, {"fault_kind": "heartbeat_expired", "fault_message": "silent"})
    call(manager.instance_update, failed, {"fault_kind": "build_timeout", "fault_message": "slow"})
    assert call(manager.instance_show, gone)["status"] == "ERROR"
    view = call(manager.instance_restart, gone)
    assert (view["status"], view["fault"]) == ("REBOOT", None)
    # A fault a new guest would not mend stays; a build stays a build.
    view = call(manager.instance_restart, failed)
    assert (view["status"], view["fault"]["kind"]) == ("ERROR", "build_timeout")
    assert call(manager.instance_restart, building)["task_status"] == "BUILDING"
    call(manager.instance_delete, building)
    with pytest.raises(Conflict, match="is being deleted"):
        call(manager.instance_restart, building)


def test_a_postgresql_create_answers_the_admin_password_and_a_reset_the_next(taskmanager):
    view = call(manager.instance_create, str(uuid.uuid4()), "pg", datastore="postgresql")
    secret = signing.guest_secret(settings.get().service_key, view["id"], 1)
    assert view["password"] == signing.admin_password(secret, 1)
    assert "password" not in call(manager.instance_show, view["id"])
    assert "password" not in create(taskmanager)  # SQLite: no users

    answer = call(manager.instance_reset_password, view["id"])
    assert (answer["instance"]["id"], answer["user"]) == (view["id"], "admin")
    assert answer["password"] == signing.admin_password(secret, 2) != view["password"]
    assert taskmanager.sent[-1] == ("reset_password", view["id"], 1, 2)
    assert call(manager.instance_reset_password, view["id"])["password"] == signing.admin_password(secret, 3)
    with pytest.raises(InvalidRequest, match="a sqlite instance has no users"):
        call(manager.instance_reset_password, create(taskmanager)["id"])
    with pytest.raises(NotFound):
        call(manager.instance_reset_password, view["id"], "another-project")


def test_the_taskmanager_records_where_clients_connect(taskmanager):
    instance_id = create(taskmanager)["id"]
    assert call(manager.instance_show, instance_id)["connection"] is None
    connection = {"host": "10.0.0.2", "port": 5432, "user": "admin", "database": "postgres"}
    call(manager.instance_update, instance_id, {"connection": connection})
    assert call(manager.instance_show, instance_id)["connection"] == connection
    call(manager.instance_update, instance_id, {"connection": {"path": "/var/x/db.sqlite3"}})
    assert call(manager.instance_show, instance_id)["connection"] == {"path": "/var/x/db.sqlite3"}
    for bad in ({}, {"password": "x"}, {"port": "5432"}, {"path": 3}, "host=x", ["path"]):
        with pytest.raises(InvalidRequest, match="connection must be"):
            call(manager.instance_update, instance_id, {"connection": bad})


def test_instance_guests_lists_every_live_instance_in_pages(taskmanager):
    ids = [create(taskmanager)["id"] for _ in range(3)]
    call(manager.instance_update, ids[1], {"fault_kind": "heartbeat_expired", "fault_message": "silent"})
    call(manager.instance_delete, ids[2])
    deleted = create(taskmanager)["id"]
    call(manager.instance_delete, deleted)
    call(manager.instance_deleted, deleted)
    first = call(manager.instance_guests, limit=2)
    assert first == [
        {"id": ids[0], "datastore": "sqlite", "generation": 1, "task_status": "BUILDING", "fault_kind": None},
        {"id": ids[1], "datastore": "sqlite", "generation": 1, "task_status": "BUILDING",
         "fault_kind": "heartbeat_expired"}]
    assert [i["id"] for i in call(manager.instance_guests, limit=2, marker=ids[1])] == [ids[2]]
    assert call(manager.instance_guests)[2]["task_status"] == "DELETING"


def test_reset_status_answers_the_record_and_what_it_cleared(taskmanager):
    instance_id = create(taskmanager)["id"]
    call(manager.instance_update, instance_id, {"fault_kind": "build_timeout", "fault_message": "slow"})
    answer = call(manager.instance_reset_status, instance_id)
    assert answer["instance"]["fault"] is None and answer["instance"]["task_status"] == "NONE"
    assert len(answer["cleared"]) == 2 and taskmanager.sent == []
    assert call(manager.instance_reset_status, instance_id)["cleared"] == []


# --- instance_update (cast by the taskmanager) ---------------------------------------------

def test_update_sets_allowed_fields_and_refuses_others(taskmanager):
    instance_id = create(taskmanager)["id"]
    call(manager.instance_update, instance_id, {"host": "10.0.0.7", "port": 5433})
    assert (row(Instance, instance_id).host, row(Instance, instance_id).port) == ("10.0.0.7", 5433)
    for fields in ({"tenant_id": "p2"}, {"credential_generation": 7}, {"port": "5433"}):
        with pytest.raises(InvalidRequest):
            call(manager.instance_update, instance_id, {"host": "evil", **fields})
    instance = row(Instance, instance_id)
    assert (instance.host, instance.tenant_id, instance.credential_generation) == ("10.0.0.7", "p1", 1)
    with pytest.raises(NotFound):
        call(manager.instance_update, new_id(), {"host": "h"})


# --- backups -------------------------------------------------------------------------------

def test_backup_create_only_of_an_active_instance_then_handed_over(taskmanager):
    instance_id, backup_id = create(taskmanager)["id"], new_id()
    with pytest.raises(Conflict, match="BUILD"):
        call(manager.backup_create, backup_id, instance_id, "nightly", project_id="p1")
    assert count(Backup) == 0 and taskmanager.sent == []
    make_active(instance_id)
    view = call(manager.backup_create, backup_id, instance_id, "nightly", "before upgrade", "p1")
    assert (view["id"], view["state"], view["instance_id"], view["project_id"], view["description"]) == (
        backup_id, "NEW", instance_id, "p1", "before upgrade")
    assert taskmanager.sent == [("create_backup", backup_id, instance_id, 1)]


def test_backup_create_is_idempotent_on_the_id(taskmanager):
    instance_id, backup_id = create(taskmanager)["id"], new_id()
    make_active(instance_id)
    first = call(manager.backup_create, backup_id, instance_id, "nightly", project_id="p1")
    again = call(manager.backup_create, backup_id, instance_id, "renamed?", project_id="p1")
    assert again == first and count(Backup) == 1
    assert taskmanager.sent == [("create_backup", backup_id, instance_id, 1)] * 2


def test_backup_create_again_once_started_hands_nothing_over(taskmanager):
    instance_id, backup_id = create(taskmanager)["id"], new_id()
    make_active(instance_id)
    call(manager.backup_create, backup_id, instance_id, "nightly", project_id="p1")
    db.run_transaction(lambda session: setattr(session.get(Backup, backup_id), "state", "BUILDING"))
    taskmanager.sent.clear()
    assert call(manager.backup_create, backup_id, instance_id, "nightly", project_id="p1")["state"] == "BUILDING"
    assert taskmanager.sent == []


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_backup_create_needs_a_canonical_uuid(taskmanager, bad_id):
    instance_id = create(taskmanager)["id"]
    make_active(instance_id)
    with pytest.raises(InvalidRequest, match="canonical UUID"):
        call(manager.backup_create, bad_id, instance_id, "nightly")
    assert count(Backup) == 0 and taskmanager.sent == []


def test_backup_of_another_projects_instance_is_not_found(taskmanager):
    theirs = create(taskmanager, project_id="p2")["id"]
    make_active(theirs)
    with pytest.raises(NotFound):
        call(manager.backup_create, new_id(), theirs, "nightly", project_id="p1")
    assert count(Backup) == 0 and taskmanager.sent == []


def test_backup_show_and_list_are_per_project(taskmanager):
    mine, theirs = completed_backup(taskmanager, "p1"), completed_backup(taskmanager, "p2")
    assert call(manager.backup_show, mine, "p1")["id"] == mine
    with pytest.raises(NotFound):
        call(manager.backup_show, theirs, "p1")
    assert [b["id"] for b in call(manager.backup_list, "p1")] == [mine]
    assert sorted(b["id"] for b in call(manager.backup_list)) == sorted([mine, theirs])
    instance_of_mine = call(manager.backup_show, mine)["instance_id"]
    assert [b["id"] for b in call(manager.backup_list, "p1", instance_of_mine)] == [mine]


def test_backup_delete_not_while_in_progress(taskmanager):
    instance_id = create(taskmanager)["id"]
    make_active(instance_id)
    backup_id = call(manager.backup_create, new_id(), instance_id, "nightly", project_id="p1")["id"]
    taskmanager.sent.clear()
    with pytest.raises(Conflict, match="NEW"):
        call(manager.backup_delete, backup_id, "p1")
    assert taskmanager.sent == []


def test_backup_delete_hands_the_location_over_and_deleted_ends_it(taskmanager):
    backup_id = completed_backup(taskmanager)
    with pytest.raises(NotFound):
        call(manager.backup_delete, backup_id, "p2")
    assert taskmanager.sent == []
    assert call(manager.backup_delete, backup_id, "p1")["id"] == backup_id
    assert taskmanager.sent == [("delete_backup", backup_id, f"file:///backups/{backup_id}")]
    assert call(manager.backup_show, backup_id)["id"] == backup_id  # until the taskmanager reports
    call(manager.backup_deleted, backup_id)
    call(manager.backup_deleted, backup_id)
    with pytest.raises(NotFound):
        call(manager.backup_show, backup_id)
    assert call(manager.backup_list) == []


def test_backup_fail(taskmanager):
    instance_id = create(taskmanager)["id"]
    make_active(instance_id)
    backup_id = call(manager.backup_create, new_id(), instance_id, "nightly", project_id="p1")["id"]
    call(manager.backup_fail, backup_id, "no guest agent runs")
    shown = call(manager.backup_show, backup_id)
    assert (shown["state"], shown["fail_reason"]) == ("FAILED", "no guest agent runs")
    call(manager.backup_fail, backup_id, "again")  # final: unchanged
    assert call(manager.backup_show, backup_id)["fail_reason"] == "no guest agent runs"
    with pytest.raises(NotFound):
        call(manager.backup_fail, new_id(), "why")


# --- work for the taskmanager is sent only after the commit --------------------------------

HANDOVERS = {
    "instance_create": lambda ids: (manager.instance_create, ids["new"], "db"),
    "instance_delete": lambda ids: (manager.instance_delete, ids["instance"]),
    "instance_restart": lambda ids: (manager.instance_restart, ids["instance"]),
    "backup_create": lambda ids: (manager.backup_create, ids["new"], ids["instance"], "nightly"),
    "backup_delete": lambda ids: (manager.backup_delete, ids["backup"]),
}


CASTS = {"instance_create": "create_instance", "instance_delete": "delete_instance",
         "instance_restart": "restart_instance", "backup_create": "create_backup",
         "backup_delete": "delete_backup"}


@pytest.fixture
def ids(taskmanager) -> dict:
    backup_id = completed_backup(taskmanager)
    return {"new": new_id(), "backup": backup_id, "instance": call(manager.backup_show, backup_id)["instance_id"]}


@pytest.mark.parametrize("handover", sorted(HANDOVERS))
def test_casts_are_only_registered_inside_the_transaction(taskmanager, ids, handover):
    function, *args = HANDOVERS[handover](ids)
    seen_inside = {}

    def work(session):
        function(session, *args)
        seen_inside["sent"] = list(taskmanager.sent)
        seen_inside["registered"] = len(session.info.get(_AFTER_COMMIT, []))
    db.run_transaction(work, retry_for=0)
    assert seen_inside == {"sent": [], "registered": 1}
    assert [cast for cast, *_args in taskmanager.sent] == [CASTS[handover]]


class Abort(Exception):
    pass


@pytest.mark.parametrize("handover", sorted(HANDOVERS))
def test_nothing_is_sent_when_the_transaction_rolls_back(taskmanager, ids, handover):
    function, *args = HANDOVERS[handover](ids)
    before = (count(Instance), count(Backup))

    def work(session):
        function(session, *args)
        raise Abort  # e.g. the commit fails, or a later step of the same task
    with pytest.raises(Abort):
        db.run_transaction(work, retry_for=0)
    assert taskmanager.sent == []
    assert (count(Instance), count(Backup)) == before
    assert row(Instance, ids["instance"]).task_status == "NONE"


def test_reads_and_reports_hand_nothing_over(taskmanager, ids):
    for function, *args in [(manager.instance_show, ids["instance"]), (manager.instance_list,),
                            (manager.backup_show, ids["backup"]), (manager.backup_list,),
                            (manager.instance_reset_status, ids["instance"]),
                            (manager.instance_update, ids["instance"], {"host": "h"}),
                            (manager.backup_fail, ids["backup"], "r"),
                            (manager.backup_deleted, ids["backup"]),
                            (manager.instance_deleted, ids["instance"])]:
        call(function, *args)
    assert taskmanager.sent == []


# --- sweep ---------------------------------------------------------------------------------

def test_sweep_answers_what_it_did(taskmanager):
    create(taskmanager)
    result = call(manager.sweep, usage_timeout=0, agent_heartbeat_expiry=30, backup_timeout=60)
    assert result == {"build_timeouts": 1, "heartbeat_expiries": 0, "restart_timeouts": 0,
                      "backup_timeouts": 0, "watermarks_removed": 0}
    assert call(manager.instance_list)[0]["status"] == "ERROR"
