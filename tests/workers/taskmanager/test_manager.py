"""The manager's logic as plain calls: the real local driver with placeholder guests, the
in-memory broker for guest commands, and the conductor's client faked at its edge (the
real ``ConductorAPI`` methods, recording what they would cast)."""

import json
import os
import signal
import stat
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from kombu import Connection

from dbaas import errors, signing
from dbaas.storage import LocalStorage
from tests.support.services import wait_until
from tests.support.stack import SLEEP, configure, processes_of
from workers.conductor import api as conductor_api
from workers.conductor.api import ConductorAPI
from workers.guestagent.api import command_queue
from workers.guestagent.commands import verify_command
from workers.taskmanager import guests
from workers.taskmanager.compute.local import LocalDriver, config_path, instance_dir
from workers.taskmanager import manager as manager_module
from workers.taskmanager.manager import (GUEST_LOST, PROVISIONING_FAILED, RESPAWN_FAILED, STOP_GRACE,
                                         Manager)

SERVICE_KEY = "k" * 32


class RecordingConductor(ConductorAPI):
    """The conductor's client with its broker cut off: each cast is recorded as
    (task name, args, kwargs); the one call the taskmanager makes, for the live instances
    (reconcile), is answered from ``live`` in pages."""

    def __init__(self):
        self.sent = []
        self.live: list[dict] = []
        self.pages = 0

    def cast(self, task_name, *args, **kwargs):
        self.sent.append((task_name, args, kwargs))

    def call(self, task_name, *args, **kwargs):
        assert task_name == conductor_api.INSTANCE_GUESTS, f"the taskmanager called {task_name}"
        self.pages += 1
        ids = [i["id"] for i in self.live]
        start = ids.index(kwargs["marker"]) + 1 if kwargs["marker"] else 0
        return self.live[start:start + kwargs["limit"]]

    def faults(self) -> dict[str, tuple[str, str]]:
        """instance id -> (fault kind, message) of each fault cast."""
        return {args[0]: (fields["fault_kind"], fields["fault_message"])
                for task, args, fields in self.sent if "fault_kind" in fields}

    def without_endpoints(self) -> list:
        """What was cast, but the records of where clients connect (made at every start)."""
        return [cast for cast in self.sent if "connection" not in cast[2]]


@pytest.fixture
def setup(monkeypatch, tmp_path):
    configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_BROKER_URL="memory://",
              DBAAS_SERVICE_KEY=SERVICE_KEY, DBAAS_GUEST_HEARTBEAT_INTERVAL="7")
    conductor = RecordingConductor()
    driver = LocalDriver([sys.executable, "-c", SLEEP], startup_grace=0.2, stop_timeout=2)
    created = []

    def new_instance() -> str:
        created.append(str(uuid.uuid4()))
        return created[-1]
    yield Manager(driver, conductor), conductor, new_instance
    for instance_id in created:
        driver.destroy(instance_id)


def commands_for(instance_id: str, generation: int = 1) -> list[tuple[str, dict]]:
    """Drain the guest's queue, verifying each command with the key of that generation."""
    secret = signing.guest_secret(SERVICE_KEY, instance_id, generation)
    taken = []
    with Connection("memory://") as connection, connection.SimpleQueue(command_queue(instance_id)) as queue:
        while True:
            try:
                message = queue.get(timeout=0.1)
            except queue.Empty:
                return taken
            taken.append(verify_command(secret, message.payload, message.headers))
            message.ack()


def test_create_delivers_a_config_with_the_derived_key(setup, tmp_path):
    manager, conductor, new_instance = setup
    instance_id = new_instance()
    manager.create_instance(instance_id, "sqlite", None, 4)
    var = tmp_path / "var"
    # SQLite listens on no port: clients open its file, where the guest keeps it.
    assert conductor.sent == [(conductor_api.INSTANCE_UPDATE, (instance_id,), {"connection": {
        "path": str(var / "instances" / instance_id / "data" / "db.sqlite3")}})]
    assert len(processes_of(instance_id)) == 1
    path = Path(config_path(instance_id))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {
        "instance_id": instance_id, "generation": 4,
        "secret": signing.guest_secret(SERVICE_KEY, instance_id, 4),
        "broker_url": "memory://", "conductor_queue": "trove-conductor", "datastore": "sqlite",
        "data_dir": str(var / "instances" / instance_id / "data"),
        "backup_root": str(var / "backups"), "heartbeat_interval": 7.0}
    assert SERVICE_KEY not in path.read_text()
    assert commands_for(instance_id, 4) == [("prepare", {})]


def test_create_records_the_endpoint_then_prepares(setup):
    manager, conductor, new_instance = setup
    instance_id = new_instance()
    manager.create_instance(instance_id, "postgresql", "file:///backups/b", 2)
    [(task, args, fields)] = conductor.sent
    assert (task, args, fields["host"]) == (conductor_api.INSTANCE_UPDATE, (instance_id,), "127.0.0.1")
    assert fields["connection"] == {"host": "127.0.0.1", "port": fields["port"], "user": "admin",
                                    "database": "postgres"}
    assert len(processes_of(instance_id)) == 1
    assert json.loads(Path(config_path(instance_id)).read_text())["datastore"] == "postgresql"
    prepare = ("prepare", {"port": fields["port"], "host": "127.0.0.1", "restore_location": "file:///backups/b"})
    assert commands_for(instance_id, 2) == [prepare]

    # Redelivered: the same endpoint, no second guest, prepare again (the guest ignores it).
    manager.create_instance(instance_id, "postgresql", "file:///backups/b", 2)
    assert conductor.sent == [(task, args, fields)] * 2
    assert len(processes_of(instance_id)) == 1
    assert commands_for(instance_id, 2) == [prepare]


def test_a_failed_spawn_is_recorded_as_a_fault(setup):
    manager, conductor, new_instance = setup
    manager.driver = LocalDriver([sys.executable, "-c", "import sys; print('no luck'); sys.exit(3)"])
    instance_id = new_instance()
    manager.create_instance(instance_id, "sqlite", None, 1)
    [(task, args, fields)] = conductor.without_endpoints()
    assert (task, args, fields["fault_kind"]) == (conductor_api.INSTANCE_UPDATE, (instance_id,), PROVISIONING_FAILED)
    assert fields["fault_message"] == "the guest agent exited at once with status 3: no luck"
    assert datetime.fromisoformat(fields["fault_at"]).tzinfo is not None
    assert commands_for(instance_id) == []


def test_an_unknown_datastore_is_a_fault_and_starts_nothing(setup):
    manager, conductor, new_instance = setup
    instance_id = new_instance()
    manager.create_instance(instance_id, "mysql", None, 1)
    [(task, args, fields)] = conductor.sent
    assert (task, args) == (conductor_api.INSTANCE_UPDATE, (instance_id,))
    assert (fields["fault_kind"], fields["fault_message"]) == (PROVISIONING_FAILED, "unknown datastore 'mysql'")
    assert processes_of(instance_id) == []
    assert not Path(instance_dir(instance_id)).exists()
    assert commands_for(instance_id) == []


def test_a_backup_goes_to_a_running_guest_or_fails_at_once(setup):
    manager, conductor, new_instance = setup
    idle, running = new_instance(), new_instance()
    manager.create_instance(running, "sqlite", None, 3)
    commands_for(running, 3)
    manager.create_backup("b1", idle, 1)
    manager.create_backup("b2", running, 3)
    assert conductor.without_endpoints() == [
        (conductor_api.BACKUP_FAIL, ("b1", f"no guest agent runs for instance {idle}"), {})]
    assert commands_for(running, 3) == [("backup", {"backup_id": "b2"})]


def kill_guest(instance_id: str) -> None:
    [pid] = processes_of(instance_id)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not processes_of(instance_id), timeout=10, message="the guest dead")


def test_restart_reaches_a_running_guest_and_starts_a_dead_one_again(setup):
    manager, conductor, new_instance = setup
    running, dead, never_built = new_instance(), new_instance(), new_instance()
    for instance_id in (running, dead):
        manager.create_instance(instance_id, "postgresql", None, 2)
        commands_for(instance_id, 2)
    endpoint = json.loads(Path(instance_dir(dead), "endpoint").read_text())
    kill_guest(dead)
    conductor.sent.clear()

    manager.restart_instance(running, 2, "postgresql")
    manager.restart_instance(dead, 2, "postgresql")
    manager.restart_instance(never_built, 5, "sqlite")
    assert commands_for(running, 2) == [("restart", {})]
    # A new guest on the data it left, with its config derived anew; it starts the
    # datastore itself: nothing to command. Where clients connect is recorded again.
    assert len(processes_of(dead)) == 1 and commands_for(dead, 2) == []
    assert json.loads(Path(config_path(dead)).read_text())["secret"] == signing.guest_secret(SERVICE_KEY, dead, 2)
    assert [(args, fields["port"]) for _, args, fields in conductor.sent if "port" in fields] == [
        ((dead,), endpoint)]
    assert conductor.faults() == {never_built: (GUEST_LOST, "no guest agent runs for the instance and "
                                                "this host holds none of its data to start one on")}
    assert processes_of(never_built) == [] and not Path(instance_dir(never_built)).exists()


def test_a_guest_that_cannot_start_again_is_a_fault(setup):
    manager, conductor, new_instance = setup
    instance_id = new_instance()
    manager.create_instance(instance_id, "sqlite", None, 1)
    kill_guest(instance_id)
    manager.driver.command = [sys.executable, "-c", "import sys; print('broken now'); sys.exit(4)"]
    manager.restart_instance(instance_id, 1, "sqlite")
    assert conductor.faults() == {instance_id: (
        RESPAWN_FAILED, "the guest agent could not be started again: the guest agent exited at once "
                        "with status 4: broken now")}


def test_reconcile_starts_a_guest_where_one_should_run_and_none_does(setup, monkeypatch, caplog):
    manager, conductor, new_instance = setup
    monkeypatch.setattr(manager_module, "RECONCILE_PAGE", 2)  # several pages
    ids = {name: new_instance() for name in (
        "alive", "dead", "expired", "lost", "building", "deleting", "broken", "orphan")}
    for name in ("alive", "dead", "expired", "deleting", "broken", "orphan"):
        manager.create_instance(ids[name], "sqlite", None, 3)
    for name in ("dead", "expired", "deleting", "broken", "orphan"):
        kill_guest(ids[name])
    started = {name: Path(instance_dir(ids[name]), "guest.pid").read_text()
               for name in ("alive", "dead", "expired")}
    conductor.live = [{"id": ids[name], "datastore": "sqlite", "generation": 3,
                       "task_status": task, "fault_kind": fault} for name, task, fault in (
        ("alive", "NONE", None), ("dead", "NONE", None), ("expired", "NONE", "heartbeat_expired"),
        ("lost", "NONE", None), ("building", "BUILDING", None), ("deleting", "DELETING", None),
        ("broken", "NONE", "provisioning_failed"))]
    conductor.sent.clear()

    manager.reconcile()
    assert conductor.pages == 4
    assert Path(instance_dir(ids["alive"]), "guest.pid").read_text() == started["alive"]
    for name in ("dead", "expired"):  # started again
        assert len(processes_of(ids[name])) == 1
        assert Path(instance_dir(ids[name]), "guest.pid").read_text() != started[name]
    # Lost: nothing held here. A build whose create has not run yet, a delete under way
    # and a fault a new guest would not mend are left alone.
    assert conductor.faults() == {ids["lost"]: (GUEST_LOST, "no guest agent runs for the instance and "
                                                "this host holds none of its data to start one on")}
    for name in ("building", "deleting", "broken", "orphan"):
        assert processes_of(ids[name]) == []
    assert ids["orphan"] in caplog.text and "not live" in caplog.text

    # Again: nothing more to do (the conductor here still reports the lost one unfaulted).
    pids = {name: processes_of(ids[name]) for name in ("alive", "dead", "expired")}
    conductor.sent.clear()
    manager.reconcile()
    assert {name: processes_of(ids[name]) for name in pids} == pids
    assert [args for _, args, _ in conductor.sent] == [(ids["lost"],)]


def test_reconcile_without_a_conductor_is_left_to_the_next_one(setup, monkeypatch, caplog):
    manager, conductor, new_instance = setup

    def unanswered(*args, **kwargs):
        raise errors.Unavailable("no conductor answered within 10 s: is one running?")
    monkeypatch.setattr(conductor, "call", unanswered)
    manager.reconcile()
    assert "reconcile skipped: no conductor answered" in caplog.text


def test_reset_password_is_sent_to_the_guest(setup):
    manager, conductor, new_instance = setup
    instance_id = new_instance()
    manager.reset_password(instance_id, 2, 7)
    assert commands_for(instance_id, 2) == [("reset_password", {"generation": 7})]


def test_delete_backup_removes_only_what_the_storage_holds(setup, tmp_path):
    manager, conductor, _ = setup
    location = LocalStorage(guests.backup_root()).put("b1", __file__)
    outside = tmp_path / "precious"
    outside.write_text("not a backup")
    manager.delete_backup("b1", location)
    manager.delete_backup("b2", outside.as_uri())  # a location a guest made up
    manager.delete_backup("b3", None)  # failed before anything was stored
    assert not LocalStorage(guests.backup_root()).exists(location)
    assert outside.read_text() == "not a backup"
    assert conductor.sent == [(conductor_api.BACKUP_DELETED, (b,), {}) for b in ("b1", "b2", "b3")]


def test_delete_instance_destroys_then_reports_it_deleted(setup):
    manager, conductor, new_instance = setup
    instance_id, never_built = new_instance(), new_instance()
    manager.create_instance(instance_id, "sqlite", None, 1)
    manager.delete_instance(instance_id)
    assert processes_of(instance_id) == []
    assert not Path(instance_dir(instance_id)).exists()
    manager.delete_instance(instance_id)  # redelivered
    manager.delete_instance(never_built)  # its create never ran
    assert conductor.without_endpoints() == [(conductor_api.INSTANCE_DELETED, (i,), {})
                                             for i in (instance_id, instance_id, never_built)]


def test_delete_without_broker_users_sends_a_stop_to_any_other_guest(setup):
    """Placeholder guests consume nothing here: the stop waits its grace, then goes with
    the queue (tests/workers/taskmanager/test_self_healing.py has a guest take it)."""
    manager, conductor, new_instance = setup
    instance_id = new_instance()
    manager.create_instance(instance_id, "sqlite", None, 6)
    commands_for(instance_id, 6)
    started = time.monotonic()
    manager.delete_instance(instance_id, 6)
    assert STOP_GRACE <= time.monotonic() - started < STOP_GRACE + 10
    assert commands_for(instance_id, 6) == []  # the queue went with the stop in it
    assert conductor.without_endpoints() == [(conductor_api.INSTANCE_DELETED, (instance_id,), {})]
