"""Throw-away PostgreSQL databases and RabbitMQ vhosts for tests, and worker processes.

With CI=true an unreachable PostgreSQL or RabbitMQ fails the run instead of skipping.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is tests/support/services.py)
PG_ADMIN_URL = os.environ.get("DBAAS_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
AMQP_HOST = os.environ.get("DBAAS_TEST_AMQP_HOST", "127.0.0.1:5672")
# RabbitMQ's management API (the taskmanager makes each guest's broker user through it).
AMQP_ADMIN_URL = os.environ.get("DBAAS_TEST_AMQP_ADMIN_URL", "http://guest:guest@127.0.0.1:15672")


def unavailable(what: str, exc: BaseException):
    message = f"{what} unreachable: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class PostgresDatabase:
    def __init__(self):
        self.name = f"dbaas_test_{uuid.uuid4().hex[:12]}"
        self.admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + self.name

    def create(self):
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        return self

    def set_connections_allowed(self, allowed: bool) -> None:
        """Make the database go away (and come back) for everyone but the admin."""
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :name"), {"name": self.name})

    def drop(self):
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


class RabbitVhost:
    def __init__(self):
        self.name = f"dbaas_test_{uuid.uuid4().hex[:12]}"
        self.url = f"amqp://guest:guest@{AMQP_HOST}/{self.name}"

    def create(self):
        _rabbitmqctl("add_vhost", self.name)
        _rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def drop(self):
        # Users are global: remove the guests' users made for this vhost with it.
        listed = subprocess.run(["rabbitmqctl", "-q", "list_permissions", "-p", self.name, "--formatter", "json"],
                                capture_output=True, text=True, timeout=60)
        for entry in json.loads(listed.stdout or "[]"):
            if entry["user"].startswith("instance-"):
                subprocess.run(["rabbitmqctl", "-q", "delete_user", entry["user"]],
                               capture_output=True, timeout=60)
        _rabbitmqctl("delete_vhost", self.name)


def _rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def check_port(host_port: str, what: str):
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        unavailable(what, exc)


def project_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBAAS_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(overrides)
    return env


def pool_children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (a worker's pool)."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in "ZX":
            children.append(int(entry))
    return children


class Worker:
    """A real ``celery -A dbaas worker`` process."""

    def __init__(self, env: dict, log_path: Path, queue: str = "trove-conductor",
                 concurrency: int = 2, name: str | None = None):
        self.env, self.log_path = env, log_path
        self.name = name or f"w{uuid.uuid4().hex[:8]}@%h"
        self.args = [sys.executable, "-m", "celery", "-A", "dbaas", "worker", "-Q", queue,
                     "-c", str(concurrency), "-n", self.name, "--loglevel", "INFO",
                     "--without-mingle", "--without-gossip"]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Worker":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log_path.read_bytes():
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker at once — main process and pool processes, like a crash
        of its host (pool processes have process groups of their own)."""
        if self.process and self.process.poll() is None:
            for pid in pool_children(self.process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process:
            self._log.close()


class Process:
    """A control-plane process other than a worker (beat, Flower), in a session of its own."""

    def __init__(self, args: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.process)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to a process started in a session of its own, SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


class Beat(Process):
    """``celery -A dbaas beat``, its log and schedule in ``directory``."""

    def __init__(self, env: dict, directory: Path):
        super().__init__([sys.executable, "-m", "celery", "-A", "dbaas", "beat", "--loglevel", "INFO",
                          "-s", str(directory / "beat-schedule")], env, directory / "beat.log")


def wait_until(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
