"""A control plane for a test: its settings in this process, the database rows a test
starts from, guests' signed messages, and the real worker processes it runs.

``Stack`` is one broker + database pair: RabbitMQ + PostgreSQL, or the embedded default
(filesystem broker + SQLite). This process is configured as the conductor (it may read and
write the database directly to arrange and check); the processes a test starts get the
environment in ``Stack.env``.
"""

import json
import os
import shlex
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from dbaas import db, settings, signing
from dbaas.models import Backup, Instance, Watermark
from tests.support.services import ROOT, Worker
from workers.conductor import auth
from workers.taskmanager.compute.local import LocalDriver, instances_root

SERVICE_KEY = "test-service-key"
# A guest that runs and does nothing: for tests of the taskmanager, not of the agent.
SLEEP = "import time; time.sleep(600)"


def configure(monkeypatch, **env) -> settings.Settings:
    """Point this process's settings (and its engine) at the given DBAAS_* values."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(settings, "_current", None)
    monkeypatch.setattr(db, "_engine", None)
    monkeypatch.setattr(auth, "_cache", None)
    return settings.get()


def guest_secret(instance_id: str, generation: int = 1) -> str:
    return signing.guest_secret(settings.get().service_key, instance_id, generation)


def make_instances(count: int, project_id: str = "default", **fields) -> dict[str, str]:
    """``count`` instances recorded directly: instance id -> its guest's secret."""
    def work(session):
        made = [Instance(name=f"db-{n}", tenant_id=project_id, credential_generation=1, **fields)
                for n in range(count)]
        session.add_all(made)
        session.flush()
        return [i.id for i in made]
    return {instance_id: guest_secret(instance_id) for instance_id in db.run_transaction(work)}


def make_backup(instance_id: str, **fields) -> str:
    def work(session):
        backup = Backup(instance_id=instance_id, name="nightly", **fields)
        session.add(backup)
        session.flush()
        return backup.id
    return db.run_transaction(work)


def instance_row(instance_id: str) -> Instance:
    with db.session_scope() as session:
        return session.get(Instance, instance_id)


def snapshot() -> list:
    """Every row of the control plane's tables, to compare before and after."""
    with db.session_scope() as session:
        rows = []
        for model in (Instance, Backup, Watermark):
            for row in session.scalars(select(model)):
                rows.append({c.name: getattr(row, c.name) for c in model.__table__.columns})
        return sorted(rows, key=repr)


def publish_heartbeats(broker_url: str, secrets: dict, messages: list) -> None:
    """``messages``: (instance id, sent, service status), each signed by its guest."""
    from tests.support.guests import Publisher
    publisher = Publisher(broker_url)
    try:
        for instance_id, sent, status in messages:
            publisher.heartbeat(instance_id, secrets[instance_id], sent, status)
    finally:
        publisher.close()


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


@dataclass
class Stack:
    kind: str
    database_url: str
    broker_url: str
    env: dict
    tmp_path: Path
    postgres: object = None

    def worker(self, name="conductor", queue="trove-conductor", **env) -> Worker:
        """A worker for tests that impersonate many guests over one broker connection
        (tests.support.guests.Publisher): RabbitMQ cannot vouch for each of them, so the
        conductor's user_id check is off unless ``env`` turns it on."""
        env = {"DBAAS_REQUIRE_GUEST_USER_ID": "false", **env}
        return Worker({**self.env, **env}, self.tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.log",
                      queue=queue)

    def client_env(self, **extra) -> dict:
        """Environment of a process that is not the conductor: the database it is given
        does not exist, so any attempt to use it fails loudly."""
        return {**self.env, "DBAAS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/no-such-database",
                **extra}


class Running:
    """A conductor and a taskmanager on one stack, and the operator's command line."""

    def __init__(self, stack: Stack, guest_command: list[str] | None):
        self.stack = stack
        self.env = {**stack.env, "DBAAS_VAR_DIR": settings.get().var_dir}
        if guest_command:
            self.env["DBAAS_GUEST_COMMAND"] = shlex.join(guest_command)
        self.client_env = {**stack.client_env(), **{k: v for k, v in self.env.items()
                                                    if k != "DBAAS_DATABASE_URL"}}
        self.conductor = Worker(self.env, stack.tmp_path / "conductor.log")
        self.taskmanager = Worker(self.client_env, stack.tmp_path / "taskmanager.log",
                                  queue="trove-taskmanager")

    def start(self) -> "Running":
        with ThreadPoolExecutor() as pool:
            list(pool.map(Worker.start, (self.conductor, self.taskmanager)))
        return self

    def stop(self) -> None:
        with ThreadPoolExecutor() as pool:  # a worker may take many seconds to exit
            list(pool.map(Worker.stop, (self.taskmanager, self.conductor)))
        # Guests outlive workers by design: end whatever a failed test left running.
        root = Path(instances_root())
        for directory in root.iterdir() if root.exists() else ():
            LocalDriver(stop_timeout=2).destroy(directory.name)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """manage.py as an operator runs it: without the database."""
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.client_env,
                              capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str):
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr + self.taskmanager.log() + self.conductor.log()
        return json.loads(result.stdout) if "--json" in args else result.stdout

    def python(self, script: str) -> None:
        """Run ``script`` in a process of its own, with this system's settings."""
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=self.client_env, check=True,
                       timeout=60)

    def handled(self, task: str) -> int:
        """How many runs of a taskmanager task have finished."""
        return self.taskmanager.log().count(f"Task taskmanager.{task}[") // 2  # received + succeeded
