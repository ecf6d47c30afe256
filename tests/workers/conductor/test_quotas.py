"""Per-project quotas and pages of lists, as the conductor's calls serve them
(workers.conductor.manager, quotas.py, paging.py) on real SQLite and PostgreSQL: the
quota is counted and the row inserted in one step, so creates fired at once from many
threads — each its own transaction, as concurrent conductors run them — never exceed it."""

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from dbaas import db
from dbaas.errors import InvalidRequest, NotFound, OverLimit
from dbaas.models import Backup, Instance
from workers.conductor import manager


@pytest.fixture
def conductor(control_plane, monkeypatch):
    """The conductor's functions, with the taskmanager's casts dropped at the edge."""
    class Ignored:
        def __getattr__(self, name):
            return lambda *args: None
    monkeypatch.setattr(manager, "taskmanager", lambda: Ignored())
    return manager


def call(function, *args, **kwargs):
    return db.run_transaction(lambda session: function(session, *args, **kwargs), retry_for=10)


def new_id() -> str:
    return str(uuid.uuid4())


def create(project="p1", name="db", **kwargs) -> dict:
    return call(manager.instance_create, new_id(), name, project_id=project, **kwargs)


def live(model, project: str) -> int:
    with db.session_scope() as session:
        return session.scalar(select(func.count()).select_from(model).where(
            model.tenant_id == project, model.deleted.is_(False)))


def active_instance(project: str) -> str:
    instance_id = create(project)["id"]
    call(manager.instance_update, instance_id, {"task_status": "NONE", "service_status": "running"})
    return instance_id


# --- limits ----------------------------------------------------------------------------------

def test_defaults_come_from_the_settings(conductor, monkeypatch):
    monkeypatch.setenv("DBAAS_QUOTA_INSTANCES", "2")
    monkeypatch.setenv("DBAAS_QUOTA_BACKUPS", "7")
    monkeypatch.setattr("dbaas.settings._current", None)
    create()
    assert call(manager.quota_show, "p1") == {
        "project_id": "p1",
        "instances": {"limit": 2, "in_use": 1, "default": True},
        "backups": {"limit": 7, "in_use": 0, "default": True}}


def test_a_create_over_the_limit_is_refused_and_records_nothing(conductor):
    call(manager.quota_update, "p1", {"instances": 2})
    create(), create()
    with pytest.raises(OverLimit, match=r"Quota exceeded for resources: \['instances'\]: 2 of 2"):
        create()
    assert live(Instance, "p1") == 2
    create("p2")  # another project's quota is its own


def test_a_retried_create_at_the_limit_is_the_same_create(conductor):
    call(manager.quota_update, "p1", {"instances": 1})
    instance_id = new_id()
    first = call(manager.instance_create, instance_id, "db", project_id="p1")
    assert call(manager.instance_create, instance_id, "db", project_id="p1")["id"] == first["id"]


def test_deleted_instances_no_longer_count(conductor):
    call(manager.quota_update, "p1", {"instances": 1})
    instance_id = create()["id"]
    call(manager.instance_delete, instance_id, "p1")
    with pytest.raises(OverLimit):  # DELETING still counts: its guest still runs
        create()
    call(manager.instance_deleted, instance_id)
    create()


def test_backups_have_a_quota_of_their_own(conductor):
    call(manager.quota_update, "p1", {"backups": 1})
    instance_id = active_instance("p1")
    call(manager.backup_create, new_id(), instance_id, "b1", project_id="p1")
    with pytest.raises(OverLimit, match=r"\['backups'\]"):
        call(manager.backup_create, new_id(), instance_id, "b2", project_id="p1")
    # The operator (no project) is held to the owner's quota too.
    with pytest.raises(OverLimit):
        call(manager.backup_create, new_id(), instance_id, "b3")
    assert live(Backup, "p1") == 1


def test_update_sets_and_resets_a_projects_own_limits(conductor):
    shown = call(manager.quota_update, "p1", {"instances": 0, "backups": 3})
    assert (shown["instances"], shown["backups"]) == (
        {"limit": 0, "in_use": 0, "default": False}, {"limit": 3, "in_use": 0, "default": False})
    with pytest.raises(OverLimit):
        create()
    shown = call(manager.quota_update, "p1", {"instances": None})
    assert shown["instances"] == {"limit": 10, "in_use": 0, "default": True}
    assert shown["backups"]["limit"] == 3


@pytest.mark.parametrize("limits", [{"instances": -1}, {"instances": "5"}, {"instances": 1.5},
                                    {"backups": True}, {"instances": 10**7}, {"volumes": 3}])
def test_update_refuses_bad_limits(conductor, limits):
    with pytest.raises(InvalidRequest):
        call(manager.quota_update, "p1", limits)


@pytest.mark.parametrize("project", ["", "x" * 65, "a\0b", 5])
def test_a_bad_project_id_is_refused(conductor, project):
    with pytest.raises(InvalidRequest):
        call(manager.quota_show, project)
    with pytest.raises(InvalidRequest):
        call(manager.instance_list, project)


# --- at once ---------------------------------------------------------------------------------

def fire(count: int, work) -> list:
    """``work(n)`` in ``count`` threads released together; each outcome or exception."""
    barrier = threading.Barrier(count)

    def one(n):
        barrier.wait()
        try:
            return work(n)
        except Exception as exc:  # the outcome under test
            return exc
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_creates_fired_at_once_never_exceed_the_quota(conductor):
    call(manager.quota_update, "p1", {"instances": 3})
    outcomes = fire(10, lambda n: create(name=f"db-{n}"))
    assert sum(isinstance(o, dict) for o in outcomes) == 3
    assert all(isinstance(o, (dict, OverLimit)) for o in outcomes), outcomes
    assert live(Instance, "p1") == 3


def test_backups_fired_at_once_never_exceed_the_quota(conductor):
    call(manager.quota_update, "p1", {"backups": 2})
    instances = [active_instance("p1") for _ in range(3)]
    outcomes = fire(9, lambda n: call(manager.backup_create, new_id(), instances[n % 3], f"b{n}",
                                      project_id="p1"))
    assert sum(isinstance(o, dict) for o in outcomes) == 2
    assert all(isinstance(o, (dict, OverLimit)) for o in outcomes), outcomes
    assert live(Backup, "p1") == 2


# --- pages -----------------------------------------------------------------------------------

def test_lists_come_in_pages_after_a_marker(conductor):
    call(manager.quota_update, "p1", {"instances": 20})
    made = [create(name=f"db-{n}")["id"] for n in range(5)]
    create("p2")
    assert [i["id"] for i in call(manager.instance_list, "p1")] == made
    assert [i["id"] for i in call(manager.instance_list, "p1", 2)] == made[:2]
    assert [i["id"] for i in call(manager.instance_list, "p1", 2, made[1])] == made[2:4]
    assert [i["id"] for i in call(manager.instance_list, "p1", 2, made[3])] == made[4:]
    assert call(manager.instance_list, "p1", 2, made[4]) == []
    # A marker deleted since keeps its place.
    call(manager.instance_deleted, made[2])
    assert [i["id"] for i in call(manager.instance_list, "p1", None, made[2])] == made[3:]


@pytest.mark.parametrize("marker", ["other-project", "unknown", "not-an-id", "a\0b", 7])
def test_a_marker_must_be_of_the_project(conductor, marker):
    other = create("p2")["id"]
    marker = {"other-project": other, "unknown": new_id()}.get(marker, marker)
    with pytest.raises(InvalidRequest, match="marker"):
        call(manager.instance_list, "p1", 2, marker)
    assert [i["id"] for i in call(manager.instance_list, None, 2, other)] == []  # the operator's


@pytest.mark.parametrize("limit", [0, -1, "2", 2.0, 10**6])
def test_a_bad_limit_is_refused(conductor, limit):
    with pytest.raises(InvalidRequest, match="limit"):
        call(manager.instance_list, "p1", limit)


def test_backup_lists_in_pages_and_by_datastore(conductor):
    instance_id = active_instance("p1")
    made = [call(manager.backup_create, new_id(), instance_id, f"b{n}", project_id="p1")["id"]
            for n in range(3)]
    assert [b["id"] for b in call(manager.backup_list, "p1", None, None, 2, made[0])] == made[1:]
    assert [b["id"] for b in call(manager.backup_list, "p1", None, "sqlite")] == made
    assert call(manager.backup_list, "p1", None, "postgresql") == []
    with pytest.raises(InvalidRequest):
        call(manager.backup_list, "p1", None, "mysql")
    with pytest.raises(NotFound):
        call(manager.backup_list, "p2", instance_id)
