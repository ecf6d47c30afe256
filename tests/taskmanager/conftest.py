"""A running control plane (conductor + taskmanager workers) on each stack, and helpers
for looking at the guest processes the taskmanager starts."""

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dbaas import db, settings
from dbaas.models import Instance
from tests.conductor.test_conductor_processes import Stack, stack  # noqa: F401  (fixture)
from tests.services import ROOT, Worker
from workers.taskmanager import guests
from workers.taskmanager.compute.local import LocalDriver

SLEEP = "import time; time.sleep(600)"


def processes_of(instance_id: str) -> list[int]:
    """Live processes whose command line names the instance."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            state = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if instance_id.encode() in cmdline and state not in "ZX":
            found.append(int(name))
    return found


def instance_row(instance_id: str) -> Instance:
    with db.session_scope() as session:
        return session.get(Instance, instance_id)


class Running:
    """A conductor and a taskmanager on one stack, and the operator's command line."""

    def __init__(self, stack: Stack, guest_command: list[str] | None):
        self.stack = stack
        self.env = {**stack.env, "DBAAS_VAR_DIR": settings.get().var_dir}
        if guest_command:
            self.env["DBAAS_GUEST_COMMAND"] = shlex.join(guest_command)
        self.conductor = Worker(self.env, stack.tmp_path / "conductor.log")
        self.taskmanager = Worker(self.env, stack.tmp_path / "taskmanager.log", queue="trove-taskmanager")

    def start(self) -> "Running":
        self.conductor.start()
        self.taskmanager.start()
        return self

    def stop(self) -> None:
        with ThreadPoolExecutor() as pool:  # a worker may take many seconds to exit
            list(pool.map(Worker.stop, (self.taskmanager, self.conductor)))
        # Guests outlive workers by design: end whatever a failed test left running.
        root = Path(guests.instances_root())
        for directory in root.iterdir() if root.exists() else ():
            LocalDriver(stop_timeout=2).destroy(directory.name)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str):
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr + self.taskmanager.log()
        return json.loads(result.stdout) if "--json" in args else result.stdout

    def python(self, script: str) -> None:
        """Run ``script`` in a process of its own, with this system's settings."""
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=self.env, check=True, timeout=60)

    def handled(self, task: str) -> int:
        """How many runs of a taskmanager task have finished."""
        return self.taskmanager.log().count(f"Task taskmanager.{task}[") // 2  # received + succeeded


@pytest.fixture
def start(stack):  # noqa: F811
    """start(guest_command) -> a Running system; stopped, and its guests ended, afterwards.
    ``None`` runs the real guest agent."""
    started = []

    def start_with(guest_command: list[str] | None) -> Running:
        started.append(Running(stack, guest_command))
        return started[-1].start()
    yield start_with
    for system in started:
        system.stop()


@pytest.fixture
def running(start) -> Running:
    """With a placeholder guest that runs and does nothing."""
    return start([sys.executable, "-c", SLEEP])
