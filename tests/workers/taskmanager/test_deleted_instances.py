"""A create that runs after its instance's delete — redelivered after the taskmanager
died, or taken by another worker process beside the delete — starts nothing and leaves
nothing behind (found by tests/faults/test_taskmanager_faults.py: it used to start a guest
nobody would ever stop, in a data directory nobody would remove, and make its broker user
and command queue again). The manager's logic as plain calls: the real local driver with
placeholder guests, the in-memory broker, the conductor's client recording its casts."""

import sys
import threading
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from tests.support.stack import SLEEP, configure, processes_of
from workers.conductor import api as conductor_api
from workers.conductor.api import ConductorAPI
from workers.guestagent.api import command_queue
from workers.taskmanager.compute.base import InstanceDeleted
from workers.taskmanager.compute.local import LocalDriver, instance_dir
from workers.taskmanager.manager import Manager

SERVICE_KEY = "k" * 32


class RecordingConductor(ConductorAPI):
    def __init__(self):
        self.sent = []

    def cast(self, task_name, *args, **kwargs):
        self.sent.append((task_name, args, kwargs))

    def call(self, task_name, *args, **kwargs):
        raise AssertionError(f"the taskmanager called {task_name}")


@pytest.fixture
def setup(monkeypatch, tmp_path):
    configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_BROKER_URL="memory://",
              DBAAS_SERVICE_KEY=SERVICE_KEY)
    conductor = RecordingConductor()
    driver = LocalDriver([sys.executable, "-c", SLEEP], startup_grace=0.5, stop_timeout=2)
    instance_id = str(uuid.uuid4())
    yield Manager(driver, conductor), driver, conductor, instance_id
    driver.destroy(instance_id)


def commands_waiting(instance_id: str) -> int:
    with Connection("memory://") as connection:
        try:
            return command_queue(instance_id)(connection.default_channel).queue_declare(passive=True).message_count
        except connection.channel_errors:
            return 0


def assert_nothing_left(instance_id: str) -> None:
    assert processes_of(instance_id) == []
    assert not Path(instance_dir(instance_id)).exists()
    assert commands_waiting(instance_id) == 0


@pytest.mark.parametrize("datastore", ["sqlite", "postgresql"])
def test_a_create_after_its_delete_starts_nothing(setup, datastore):
    manager, driver, conductor, instance_id = setup
    manager.delete_instance(instance_id)
    manager.create_instance(instance_id, datastore, None, 1)
    assert_nothing_left(instance_id)
    assert driver.is_deleted(instance_id)
    # No fault recorded for an instance that is gone (an update cast about it before the
    # create noticed is refused by the conductor: the record is deleted).
    assert (conductor_api.INSTANCE_DELETED, (instance_id,), {}) in conductor.sent
    assert not [fields for task, _, fields in conductor.sent
                if task == conductor_api.INSTANCE_UPDATE and "fault_kind" in fields]


def test_a_delete_beside_a_create_leaves_nothing(setup):
    manager, driver, conductor, instance_id = setup
    creating = threading.Thread(target=manager.create_instance, args=(instance_id, "sqlite", None, 1))
    creating.start()
    while not processes_of(instance_id) and creating.is_alive():  # the guest started: spawn waits
        pass
    manager.delete_instance(instance_id)
    creating.join(30)
    assert_nothing_left(instance_id)


def test_the_driver_refuses_to_start_a_deleted_instance(setup):
    _, driver, _, instance_id = setup
    driver.destroy(instance_id)  # never spawned: still remembered as deleted
    with pytest.raises(InstanceDeleted):
        driver.allocate_endpoint(instance_id)
    with pytest.raises(InstanceDeleted):
        driver.spawn(instance_id, None)
    assert processes_of(instance_id) == []
    driver.destroy(instance_id)  # what the refused calls made is removed
    assert not Path(instance_dir(instance_id)).exists()
