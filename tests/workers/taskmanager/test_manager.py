"""The manager's logic as plain calls: the real local driver with placeholder guests, the
in-memory broker for guest commands, and the conductor's client faked at its edge (the
real ``ConductorAPI`` methods, recording what they would cast)."""

import json
import stat
import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from kombu import Connection

from dbaas import signing
from dbaas.storage import LocalStorage
from tests.support.stack import SLEEP, configure, processes_of
from workers.conductor import api as conductor_api
from workers.conductor.api import ConductorAPI
from workers.guestagent.api import command_queue
from workers.guestagent.commands import verify_command
from workers.taskmanager import guests
from workers.taskmanager.compute.local import LocalDriver, config_path, instance_dir
from workers.taskmanager.manager import PROVISIONING_FAILED, Manager

SERVICE_KEY = "k" * 32


class RecordingConductor(ConductorAPI):
    """The conductor's client with its broker cut off: each cast is recorded as
    (task name, args, kwargs); the taskmanager has no business calling (waiting on) it."""

    def __init__(self):
        self.sent = []

    def cast(self, task_name, *args, **kwargs):
        self.sent.append((task_name, args, kwargs))

    def call(self, task_name, *args, **kwargs):
        raise AssertionError(f"the taskmanager called {task_name}")


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
    assert conductor.sent == []  # SQLite listens on no port: nothing to record
    assert len(processes_of(instance_id)) == 1
    path = Path(config_path(instance_id))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    var = tmp_path / "var"
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
    assert set(fields) == {"host", "port"}
    assert len(processes_of(instance_id)) == 1
    assert json.loads(Path(config_path(instance_id)).read_text())["datastore"] == "postgresql"
    prepare = ("prepare", {"port": fields["port"], "restore_location": "file:///backups/b"})
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
    [(task, args, fields)] = conductor.sent
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
    assert conductor.sent == [(conductor_api.BACKUP_FAIL, ("b1", f"no guest agent runs for instance {idle}"), {})]
    assert commands_for(running, 3) == [("backup", {"backup_id": "b2"})]


def test_restart_is_sent_signed_with_the_generation_even_to_a_stopped_guest(setup):
    manager, conductor, new_instance = setup
    running, stopped = new_instance(), new_instance()
    manager.create_instance(running, "sqlite", None, 2)
    commands_for(running, 2)
    manager.restart_instance(running, 2)
    manager.restart_instance(stopped, 5)  # it waits in the queue for a guest
    assert commands_for(running, 2) == [("restart", {})]
    assert commands_for(stopped, 5) == [("restart", {})]
    assert conductor.sent == []


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
    assert conductor.sent == [(conductor_api.INSTANCE_DELETED, (i,), {})
                              for i in (instance_id, instance_id, never_built)]
