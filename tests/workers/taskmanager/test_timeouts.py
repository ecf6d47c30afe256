"""Faults the system must notice by itself, with beat's sweeps running: a guest killed
with SIGKILL, a guest that never reports, a backup its guest never finishes."""

import os
import signal
import sys
import time

import pytest

from tests.support.services import Beat, wait_until
from tests.support.stack import SLEEP, Running, instance_row, processes_of
from workers.guestagent import config as guest_config
from workers.taskmanager.compute.local import LocalDriver, config_path

EXPIRY, SWEEP, USAGE_TIMEOUT, BACKUP_TIMEOUT = 3.0, 1.0, 10.0, 6.0
SHORT_TIMEOUTS = {
    "DBAAS_GUEST_HEARTBEAT_INTERVAL": "0.5",
    "DBAAS_AGENT_HEARTBEAT_EXPIRY": str(EXPIRY),
    "DBAAS_SWEEP_INTERVAL": str(SWEEP),
    "DBAAS_USAGE_TIMEOUT": str(USAGE_TIMEOUT),
    "DBAAS_BACKUP_TIMEOUT": str(BACKUP_TIMEOUT),
}


@pytest.fixture
def system(stack, tmp_path):  # noqa: F811
    """launch(guest_command=None) -> conductor, taskmanager and one beat, with short timeouts."""
    started, beats = [], []

    def launch(guest_command=None) -> Running:
        running = Running(stack, guest_command)
        # The conductor's environment, and that of the taskmanager, beat and the CLI.
        running.env.update(SHORT_TIMEOUTS)
        running.client_env.update(SHORT_TIMEOUTS)
        started.append(running.start())
        beats.append(Beat(running.client_env, tmp_path))  # beat holds no database either
        return running
    yield launch
    for beat in beats:
        beat.stop()
    for running in started:
        running.stop()


def status_of(instance_id: str) -> tuple[str | None, str | None]:
    row = instance_row(instance_id)
    return row.service_status, row.fault_kind


def test_a_killed_guest_turns_error_and_recovers_when_a_guest_starts_again(system):
    running = system()
    view = running.ok("instance", "create", "victim", "--wait", "--timeout", "120", "--json")
    assert view["status"] == "ACTIVE"
    instance_id = view["id"]
    for pid in processes_of(instance_id):
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: running.ok("instance", "show", instance_id, "--json")["status"] == "ERROR",
               timeout=EXPIRY + 4 * SWEEP + 20, message="ERROR after the guest died")
    # Detected within the expiry plus a sweep period (and the time a sweep message takes).
    assert time.monotonic() - killed_at <= EXPIRY + SWEEP + 8
    assert running.ok("instance", "show", instance_id, "--json")["fault"]["kind"] == "heartbeat_expired"

    # A guest started again with the config the taskmanager delivered.
    LocalDriver().spawn(instance_id, guest_config.load(config_path(instance_id)))
    wait_until(lambda: running.ok("instance", "show", instance_id, "--json")["status"] == "ACTIVE",
               timeout=60, message="ACTIVE once heartbeats resume")
    running.ok("instance", "delete", instance_id)


def test_an_instance_whose_guest_never_reports_times_out_across_a_taskmanager_restart(system):
    running = system([sys.executable, "-c", SLEEP])
    view = running.ok("instance", "create", "silent", "--json")
    wait_until(lambda: processes_of(view["id"]), timeout=60, message="the silent guest started")
    running.taskmanager.kill()
    running.taskmanager.start()
    wait_until(lambda: status_of(view["id"])[1] == "build_timeout",
               timeout=USAGE_TIMEOUT + 4 * SWEEP + 30, message="the build timeout")
    shown = running.ok("instance", "show", view["id"], "--json")
    assert shown["status"] == "ERROR" and "10s" in shown["fault"]["message"]


def test_a_backup_its_guest_never_finishes_fails(system):
    running = system()
    view = running.ok("instance", "create", "frozen", "--wait", "--timeout", "120", "--json")
    guest_pids = processes_of(view["id"])
    for pid in guest_pids:
        os.kill(pid, signal.SIGSTOP)  # alive to the driver, but it will never report again
    try:
        backup = running.ok("backup", "create", view["id"], "nightly", "--json")
        wait_until(lambda: running.ok("backup", "show", backup["id"], "--json")["state"] == "FAILED",
                   timeout=BACKUP_TIMEOUT + 4 * SWEEP + 30, message="the backup FAILED")
    finally:
        for pid in guest_pids:
            os.kill(pid, signal.SIGKILL)
