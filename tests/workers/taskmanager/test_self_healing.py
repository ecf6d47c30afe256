"""Guests that die come back, and every guest of a deleted instance goes: real conductor,
taskmanager and beat processes, real guest agents, driven through manage.py (without the
database), on RabbitMQ + PostgreSQL and on the embedded default."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.services import ROOT, Beat, wait_until
from tests.support.stack import Running, instance_row, processes_of
from workers.guestagent import config as guest_config
from workers.guestagent.api import running_agent
from workers.taskmanager.compute.local import config_path, instance_dir

EXPIRY = 3.0
FAST = {
    "DBAAS_GUEST_HEARTBEAT_INTERVAL": "0.5",
    "DBAAS_AGENT_HEARTBEAT_EXPIRY": str(EXPIRY),
    "DBAAS_SWEEP_INTERVAL": "1",
    # A guest started by hand beside the instance's own needs connections of its own.
    "DBAAS_GUEST_MAX_CONNECTIONS": "6",
}
WAIT = ("--wait", "--timeout", "120", "--json")


@pytest.fixture
def system(stack, tmp_path):  # noqa: F811  (stack: the fixture)
    """launch(**env) -> conductor and taskmanager with fast heartbeats; beat(reconcile
    interval) starts one beat; everything stopped afterwards."""
    started, beats = [], []

    class System(Running):
        def beat(self, reconcile_interval: float) -> None:
            env = {**self.client_env, "DBAAS_RECONCILE_INTERVAL": str(reconcile_interval)}
            beats.append(Beat(env, tmp_path))

        def show(self, instance_id: str) -> dict:
            return self.ok("instance", "show", instance_id, "--json")

        def create(self, name: str) -> dict:
            view = self.ok("instance", "create", name, *WAIT)
            assert view["status"] == "ACTIVE", view
            return view

    def launch(**env) -> System:
        running = System(stack, None)
        for target in (running.env, running.client_env):
            target.update(FAST, **env)
        started.append(running.start())
        return running
    yield launch
    for beat in beats:
        beat.stop()
    for running in started:
        running.stop()


def data_dir(instance_id: str) -> str:
    return os.path.join(instance_dir(instance_id), "data")


def agent_of(instance_id: str) -> int:
    return wait_until(lambda: running_agent(data_dir(instance_id)), timeout=30, message="the agent recorded")


def kill_agent(instance_id: str) -> int:
    pid = agent_of(instance_id)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: running_agent(data_dir(instance_id)) is None, timeout=10, message="the agent dead")
    return pid


def zombies_under(worker: subprocess.Popen) -> list[str]:
    """Zombie processes whose parent is the worker or one of its pool processes."""
    stats = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        stats[int(name)] = (fields[0], int(fields[1]))
    workers = {worker.pid} | {pid for pid, (_, parent) in stats.items() if parent == worker.pid}
    return [f"{pid} (parent {parent})" for pid, (state, parent) in stats.items()
            if state == "Z" and parent in workers]


def by_hand(config_file: str, log: Path) -> subprocess.Popen:
    """``python -m workers.guestagent run`` as an operator starts it, from the repository."""
    with open(log, "ab") as output:
        return subprocess.Popen([sys.executable, "-m", "workers.guestagent", "run", "--config", config_file],
                                cwd=ROOT, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_killed_guest_comes_back_with_restart_and_is_reaped(system):
    running = system()
    running.beat(reconcile_interval=3600)  # the sweeps only: the restart brings it back
    instance_id = running.create("victim")["id"]
    killed = kill_agent(instance_id)
    # The taskmanager's pool process that started the guest waited for it: no <defunct>.
    wait_until(lambda: not zombies_under(running.taskmanager.process), timeout=5,
               message=f"no zombies under the taskmanager: {zombies_under(running.taskmanager.process)}")
    wait_until(lambda: running.show(instance_id)["status"] == "ERROR", timeout=EXPIRY + 30,
               message="ERROR after the guest died")
    assert running.show(instance_id)["fault"]["kind"] == "heartbeat_expired"

    started = time.monotonic()
    result = running.cli("instance", "restart", instance_id, *WAIT)
    print(f"{running.stack.kind}: restart --wait, ERROR to ACTIVE: {time.monotonic() - started:.1f}s")
    assert result.returncode == 0, result.stderr + running.taskmanager.log()[-3000:]
    view = json.loads(result.stdout)
    assert (view["status"], view["fault"]) == ("ACTIVE", None)
    assert result.stderr.splitlines() == [f"instance {instance_id}: REBOOT", f"instance {instance_id}: ACTIVE"]
    assert agent_of(instance_id) != killed
    wait_until(lambda: f"started the guest of {instance_id} again" in running.taskmanager.log(),
               timeout=10, message="the taskmanager saying so")

    # A restart whose guest cannot come back: its data is gone. ERROR, and why.
    kill_agent(instance_id)
    shutil.rmtree(instance_dir(instance_id))
    result = running.cli("instance", "restart", instance_id, *WAIT)
    assert result.returncode == 1
    assert json.loads(result.stdout)["fault"]["kind"] == "guest_lost"
    assert result.stderr.splitlines()[-1] == (
        f"error: instance {instance_id} is ERROR: no guest agent runs for the instance and this "
        f"host holds none of its data to start one on")


def test_the_taskmanager_reconciles_as_it_starts_and_when_beat_says(system):
    running = system()
    instance_id, lost = running.create("kept")["id"], running.create("lost")["id"]

    # Both guests die while no taskmanager runs; one instance's data goes with it.
    running.taskmanager.stop()
    first = kill_agent(instance_id)
    kill_agent(lost)
    shutil.rmtree(instance_dir(lost))
    running.taskmanager.start()
    second = agent_of(instance_id)
    assert second != first
    wait_until(lambda: running.show(lost)["status"] == "ERROR", timeout=30, message="the lost one ERROR")
    assert running.show(lost)["fault"]["message"] == (
        "no guest agent runs for the instance and this host holds none of its data to start one on")
    wait_until(lambda: running.show(instance_id)["status"] == "ACTIVE", timeout=30, message="ACTIVE")

    # With a taskmanager running, a guest that dies is back by beat's next reconcile.
    running.beat(reconcile_interval=2)
    kill_agent(instance_id)
    third = agent_of(instance_id)
    assert third not in (first, second)
    assert running.taskmanager.log().count(f"no guest runs for instance {instance_id}: starting one") == 2
    wait_until(lambda: running.show(instance_id)["status"] == "ACTIVE", timeout=30, message="ACTIVE again")
    assert not zombies_under(running.taskmanager.process)


def test_one_guest_per_instance_and_delete_stops_one_started_by_hand(system, tmp_path):
    running = system()
    instance_id = running.create("single")["id"]
    config_file = config_path(instance_id)

    # A second agent of the same instance exits at once, saying so in one line.
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "workers.guestagent", "run", "--config", config_file],
                            cwd=ROOT, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 10
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr.splitlines() == [
        f"instance {instance_id}: another guest agent runs for the data in {data_dir(instance_id)} "
        f"(pid {agent_of(instance_id)}): not starting a second one"]

    # The operator replaces the instance's guest with one of their own, in another session
    # and directory; delete stops it all the same.
    kill_agent(instance_id)
    operators = by_hand(config_file, tmp_path / "by-hand.log")
    wait_until(lambda: running_agent(data_dir(instance_id)) == operators.pid, timeout=30,
               message="the hand-started agent recorded")
    running.ok("instance", "delete", instance_id)
    wait_until(lambda: instance_row(instance_id).deleted, timeout=60, message="the instance deleted")
    assert operators.wait(timeout=10) == 0  # SIGTERM: a clean stop
    assert processes_of(instance_id) == [] and not Path(instance_dir(instance_id)).exists()


def test_a_deleted_instances_guest_stops_by_itself(system, tmp_path):
    """A guest the driver cannot find — started by hand from a copy of the config, on data
    of its own — stops once its instance is deleted: on RabbitMQ because its broker user is
    gone (its logins refused), on the embedded broker because delete sends it ``stop``."""
    running = system()
    instance_id = running.create("copied")["id"]
    config = guest_config.load(config_path(instance_id))
    copy = tmp_path / "elsewhere.json"
    guest_config.write(str(copy), guest_config.GuestConfig(**{**config.__dict__, "data_dir": str(tmp_path / "data")}))
    stray = by_hand(str(copy), tmp_path / "stray.log")
    wait_until(lambda: "Connected to" in (tmp_path / "stray.log").read_text(), timeout=30,
               message="the stray guest consuming")

    started = time.monotonic()
    running.ok("instance", "delete", instance_id)
    wait_until(lambda: instance_row(instance_id).deleted, timeout=60, message="the instance deleted")
    assert stray.wait(timeout=60) == 0
    print(f"{running.stack.kind}: the stray guest stopped {time.monotonic() - started:.1f}s after the delete")
    log = (tmp_path / "stray.log").read_text()
    if running.stack.kind == "embedded":
        assert "command stop {}" in log
    else:
        assert "refused this guest's login 5 times in a row" in log
    assert log.rstrip().endswith(f"agent for instance {instance_id} stopped")
