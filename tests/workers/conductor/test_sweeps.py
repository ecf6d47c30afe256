"""Timeout sweeps as plain functions on SQLite and PostgreSQL."""

import time
import uuid
from datetime import timedelta

from sqlalchemy import select

from dbaas import db
from dbaas.models import Backup, Instance, Watermark, utcnow
from workers.conductor import instances, sweeps
from workers.conductor.heartbeats import apply_heartbeats
from workers.conductor.messages import Heartbeat

TIMEOUTS = {"usage_timeout": 60, "agent_heartbeat_expiry": 30, "backup_timeout": 120}


def new_instance(age_seconds: float = 0, **fields) -> str:
    with db.session_scope() as session:
        instance, _created = instances.create(session, str(uuid.uuid4()), "db", None, "default")
        instance.created = utcnow() - timedelta(seconds=age_seconds)
        for name, value in fields.items():
            setattr(instance, name, value)
        return instance.id


def run_sweep(now=None) -> dict:
    return db.run_transaction(lambda s: sweeps.sweep(s, now or utcnow(), **TIMEOUTS))


def view(instance_id: str) -> dict:
    with db.session_scope() as session:
        return instances.view(session.get(Instance, instance_id))


def beat(instance_id: str, status: str = "running") -> None:
    db.run_transaction(lambda s: apply_heartbeats(
        s, [Heartbeat(instance_id, time.time(), status, None)], utcnow()))


def test_a_restart_without_reports_turns_error_and_one_with_reports_does_not(control_plane):
    silent, restarting = new_instance(), new_instance()
    for instance_id in (silent, restarting):
        beat(instance_id)
        db.run_transaction(lambda s, i=instance_id: instances.request_restart(s, i))
    assert view(silent)["status"] == "REBOOT"
    assert run_sweep()["restart_timeouts"] == 0
    # A report of the restart under way writes the row: the restart is not silent.
    before = view(restarting)["updated"]
    time.sleep(0.01)
    beat(restarting, "restarting")
    assert view(restarting)["updated"] > before
    later = utcnow() + timedelta(seconds=31)
    with db.session_scope() as session:  # ... and it went on reporting since
        session.get(Instance, restarting).updated = later - timedelta(seconds=5)
    assert run_sweep(later)["restart_timeouts"] == 1
    assert (view(silent)["status"], view(silent)["fault"]["kind"]) == ("ERROR", sweeps.RESTART_TIMEOUT)
    assert "within 30s of the restart" in view(silent)["fault"]["message"]
    assert view(restarting)["status"] == "REBOOT"
    assert run_sweep(later)["restart_timeouts"] == 0
    # Its guest comes back after all: a restart clears the fault, a report ends the restart.
    db.run_transaction(lambda s: instances.request_restart(s, silent))
    beat(silent)
    assert view(silent)["status"] == "ACTIVE"


def test_build_timeout_turns_error_once(control_plane):
    stuck, young = new_instance(age_seconds=61), new_instance(age_seconds=10)
    assert run_sweep()["build_timeouts"] == 1
    assert view(stuck)["status"] == "ERROR" and "60s" in view(stuck)["fault"]["message"]
    assert view(young)["status"] == "BUILD"
    assert run_sweep()["build_timeouts"] == 0  # a duplicated tick changes nothing


def test_silent_active_instance_turns_error_and_recovers_on_heartbeat(control_plane):
    instance_id = new_instance()
    beat(instance_id)
    assert view(instance_id)["status"] == "ACTIVE"
    assert run_sweep()["heartbeat_expiries"] == 0
    later = utcnow() + timedelta(seconds=31)
    assert run_sweep(later)["heartbeat_expiries"] == 1
    assert view(instance_id)["status"] == "ERROR"
    assert view(instance_id)["fault"]["kind"] == "heartbeat_expired"
    assert run_sweep(later)["heartbeat_expiries"] == 0
    beat(instance_id)
    assert view(instance_id)["status"] == "ACTIVE" and view(instance_id)["fault"] is None


def test_building_instance_is_not_expired_by_the_heartbeat_sweep(control_plane):
    instance_id = new_instance(last_heartbeat=utcnow() - timedelta(seconds=300))
    assert run_sweep()["heartbeat_expiries"] == 0
    assert view(instance_id)["status"] == "BUILD"


def test_stale_backups_fail_and_stay_failed(control_plane):
    instance_id = new_instance()
    with db.session_scope() as session:
        old = Backup(instance_id=instance_id, name="old", state="BUILDING",
                     created=utcnow() - timedelta(seconds=121))
        done = Backup(instance_id=instance_id, name="done", state="COMPLETED",
                      created=utcnow() - timedelta(seconds=500))
        fresh = Backup(instance_id=instance_id, name="fresh")
        session.add_all([old, done, fresh])
        session.flush()
        ids = old.id, done.id, fresh.id
    assert run_sweep()["backup_timeouts"] == 1
    with db.session_scope() as session:
        states = [session.get(Backup, i).state for i in ids]
    assert states == ["FAILED", "COMPLETED", "NEW"]
    assert run_sweep()["backup_timeouts"] == 0


def test_watermarks_of_deleted_instances_are_removed(control_plane):
    gone, kept = new_instance(), new_instance()
    beat(gone)
    beat(kept)
    with db.session_scope() as session:
        session.get(Instance, gone).deleted = True
    assert run_sweep()["watermarks_removed"] == 1
    with db.session_scope() as session:
        assert set(session.scalars(select(Watermark.key))) == {kept}
