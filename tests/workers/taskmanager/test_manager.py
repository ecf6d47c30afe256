"""The manager's logic as plain calls: the real local driver with placeholder guests, the
in-memory broker for guest commands, and the conductor recorded at its edge."""

import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from kombu import Connection

from dbaas.storage import LocalStorage
from tests.support.stack import configure
from tests.support.stack import SLEEP, processes_of
from workers.guestagent import config as guest_config
from workers.guestagent.commands import command_queue, verify_command
from workers.taskmanager import guests
from workers.taskmanager.compute.local import LocalDriver
from workers.taskmanager.manager import PROVISIONING_FAILED, Manager


class RecordingConductor:
    """The conductor's CRUD client, recording what would be sent."""

    def __init__(self):
        self.sent = []

    def __getattr__(self, task):
        return lambda *args, **kwargs: self.sent.append((task, args, kwargs))


@pytest.fixture
def setup(monkeypatch, tmp_path):
    configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_BROKER_URL="memory://",
              DBAAS_SERVICE_KEY="k")
    conductor = RecordingConductor()
    driver = LocalDriver([sys.executable, "-c", SLEEP], startup_grace=0.2, stop_timeout=2)
    created = []

    def new_instance(datastore="sqlite") -> str:
        instance_id = str(uuid.uuid4())
        guest_config.write(guests.config_path(instance_id), guest_config.GuestConfig(
            instance_id=instance_id, secret="s" * 64, broker_url="memory://", datastore=datastore))
        created.append(instance_id)
        return instance_id
    yield Manager(driver, conductor), conductor, new_instance
    for instance_id in created:
        driver.destroy(instance_id)


def commands_for(instance_id: str) -> list[tuple[str, dict]]:
    taken = []
    with Connection("memory://") as connection, connection.SimpleQueue(command_queue(instance_id)) as queue:
        while True:
            try:
                message = queue.get(timeout=0.1)
            except queue.Empty:
                return taken
            taken.append(verify_command("s" * 64, message.payload, message.headers))
            message.ack()


def test_create_records_the_endpoint_then_prepares(setup):
    manager, conductor, new_instance = setup
    instance_id = new_instance("postgresql")
    manager.create_instance(instance_id, "postgresql", "file:///backups/b")
    [(task, args, fields)] = conductor.sent
    assert (task, args, fields["host"]) == ("instance_update", (instance_id,), "127.0.0.1")
    assert len(processes_of(instance_id)) == 1
    assert commands_for(instance_id) == [("prepare", {"port": fields["port"],
                                                      "restore_location": "file:///backups/b"})]


def test_a_failed_spawn_is_recorded_as_a_fault(setup):
    manager, conductor, new_instance = setup
    instance_id = new_instance()
    Path(guests.config_path(instance_id)).unlink()
    manager.create_instance(instance_id, "sqlite")
    [(task, args, fields)] = conductor.sent
    assert (task, args, fields["fault_kind"]) == ("instance_update", (instance_id,), PROVISIONING_FAILED)
    assert fields["fault_message"].startswith("no guest config at ")
    assert datetime.fromisoformat(fields["fault_at"]).tzinfo is not None
    assert commands_for(instance_id) == []


def test_a_backup_goes_to_a_running_guest_or_fails_at_once(setup):
    manager, conductor, new_instance = setup
    idle, running = new_instance(), new_instance()
    manager.driver.spawn(running, guests.config_path(running))
    manager.create_backup("b1", idle)
    manager.create_backup("b2", running)
    assert conductor.sent == [("backup_fail", ("b1", f"no guest agent runs for instance {idle}"), {})]
    assert commands_for(running) == [("backup", {"backup_id": "b2"})]


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
    assert conductor.sent == [("backup_delete", (b,), {}) for b in ("b1", "b2", "b3")]


def test_delete_instance_destroys_then_deletes_the_record(setup):
    manager, conductor, new_instance = setup
    instance_id = new_instance()
    manager.create_instance(instance_id, "sqlite")
    manager.delete_instance(instance_id)
    assert processes_of(instance_id) == []
    assert not Path(guests.instance_dir(instance_id)).exists()
    assert conductor.sent == [("instance_delete", (instance_id,), {})]
