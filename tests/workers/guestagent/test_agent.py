"""The guest agent as the compute driver runs it: a real ``python -m workers.guestagent run``
process, commanded over a real broker, reporting to a real conductor worker."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbaas import db
from dbaas.models import Backup, Instance
from dbaas.storage import LocalStorage
from tests.support.services import ROOT, project_env, wait_until
from tests.support.stack import make_backup, make_instances
from tests.workers.guestagent.test_datastores import contents, fill
from workers.guestagent import commands
from workers.guestagent import config as guest_config
from workers.guestagent.agent import GB
from workers.guestagent.datastores import datastore_for
from workers.guestagent.datastores.postgresql import cluster_running, free_port, stop_cluster

HEARTBEAT_INTERVAL = 0.5


class Guest:
    """One instance's agent process, started detached as the compute driver does, with
    nothing but its config file: no database settings in its environment."""

    def __init__(self, instance_id: str, secret: str, datastore: str, broker_url: str,
                 guest_dir: Path):
        self.instance_id, self.secret, self.broker_url = instance_id, secret, broker_url
        self.config = guest_config.GuestConfig(
            instance_id=instance_id, secret=secret, generation=1, broker_url=broker_url,
            datastore=datastore, data_dir=str(guest_dir / instance_id), backup_root=str(guest_dir / "backups"),
            heartbeat_interval=HEARTBEAT_INTERVAL)
        self.config_path = guest_dir / f"{instance_id}.json"
        guest_config.write(str(self.config_path), self.config)
        self.log_path = guest_dir / f"{instance_id}.log"
        self.datastore = datastore_for(datastore, self.config.data_dir)
        self.process: subprocess.Popen | None = None

    def start(self) -> "Guest":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.guestagent", "run", "--config", str(self.config_path)],
                cwd=ROOT, env=project_env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self

    def command(self, name: str, **args) -> None:
        commands.send_command(self.broker_url, self.instance_id, self.secret, name, args)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop_with(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL the agent's process group, as its driver would: that takes the agent's
        children (initdb, pg_dump…) too, but not its postmaster (a session of its own)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def instance(instance_id: str) -> Instance:
    with db.session_scope() as session:
        row = session.get(Instance, instance_id)
        session.expunge(row)
        return row


def backup_row(backup_id: str) -> Backup:
    with db.session_scope() as session:
        row = session.get(Backup, backup_id)
        session.expunge(row)
        return row


def new_guest(datastore: str, broker_url: str, guest_dir: Path) -> Guest:
    """An instance recorded as the conductor records it, and its guest holding the key
    derived for it (generation 1)."""
    [(instance_id, secret)] = make_instances(1, datastore=datastore).items()
    return Guest(instance_id, secret, datastore, broker_url, guest_dir)


def wait_for_status(guest: Guest, status: str, timeout: float = 60) -> Instance:
    return wait_until(lambda: (row := instance(guest.instance_id)).service_status == status and row,
                      timeout=timeout, interval=0.1, message=status)


def postmaster_pid(guest: Guest) -> str:
    return (guest.datastore.pgdata / "postmaster.pid").read_text().split()[0]


@pytest.mark.parametrize("datastore", ["sqlite", "postgresql"])
def test_guest_lifecycle(stack, datastore, guest_dir, request):  # noqa: F811  (stack: the fixture)
    if datastore == "postgresql":
        request.getfixturevalue("postgres_programs")
    postgres = datastore == "postgresql"
    worker = stack.worker().start()
    guest = new_guest(datastore, stack.broker_url, guest_dir)
    restored = new_guest(datastore, stack.broker_url, guest_dir)
    # Alongside (a conductor worker is slow to start and stop): a guest whose prepare fails.
    broken = new_guest(datastore, stack.broker_url, guest_dir)
    try:
        broken.start()
        missing = LocalStorage(broken.config.backup_root).root / "no-such-backup"
        broken.command("prepare", restore_location=missing.as_uri())
        guest.start()
        port = free_port()  # as the taskmanager picks one
        guest.command("prepare", **({"port": port} if postgres else {}))
        wait_for_status(guest, "running")
        if postgres:
            assert guest.datastore.connection_info()["port"] == port
        fill(guest.datastore)
        rows = contents(guest.datastore)

        # Commands not signed with the instance's secret are refused, and consumed.
        commands.send_command(stack.broker_url, guest.instance_id, "0" * 64, "stop", {})
        wait_until(lambda: "refused a command" in guest.log(), timeout=30, message="a refusal")

        backup_id = make_backup(guest.instance_id)
        started = time.monotonic()
        guest.command("backup", backup_id=backup_id)
        backup = wait_until(lambda: (row := backup_row(backup_id)).state == "COMPLETED" and row,
                            timeout=60, interval=0.1, message="a completed backup")
        print(f"{datastore}: backup COMPLETED {time.monotonic() - started:.2f}s after the command")
        stored = LocalStorage(guest.config.backup_root).path(backup.location).read_bytes()
        assert backup.checksum == hashlib.sha256(stored).hexdigest()
        assert backup.size == pytest.approx(len(stored) / GB)
        assert backup.backup_type == ("pg_dump" if postgres else "sqlite-online")

        # A redelivered backup command re-reports (the conductor refuses: already final).
        guest.command("backup", backup_id=backup_id)
        wait_until(lambda: "reporting it again" in guest.log(), timeout=30, message="a re-report")

        # The datastore fails under the agent: the heartbeats say so; a restart mends it.
        if postgres:
            stop_cluster(guest.config.data_dir)
        else:
            database = guest.datastore.path
            database.rename(database.with_name("aside"))
        wait_for_status(guest, "crashed")
        if not postgres:
            database.with_name("aside").rename(database)
        guest.command("restart")
        wait_until(lambda: "command restart done" in guest.log(), timeout=30, message="a restart")
        wait_for_status(guest, "running")

        # A new instance restored from that backup holds the same rows, even when its
        # agent is killed mid-prepare (a PostgreSQL restore takes long enough) and started
        # again: the prepare is redelivered and done over. SIGTERM stops it.
        restored.start()
        restored.command("prepare", restore_location=backup.location)
        wait_until(lambda: "command prepare" in restored.log(), timeout=30, message="a prepare")
        restored.kill()
        restored.start()
        wait_until(lambda: restored.log().count("Connected to") == 2 and restored.datastore.probe(),
                   timeout=60, message="the restarted agent's datastore")
        wait_for_status(restored, "running")
        if postgres:  # not vacuous: the kill did interrupt the prepare
            assert restored.log().count("command prepare {") == 2
        assert contents(restored.datastore) == rows != ""
        assert restored.stop_with(signal.SIGTERM) == 0
        wait_for_status(restored, "shutdown")
        if postgres:
            assert not cluster_running(restored.datastore.pgdata)

        # A SIGKILLed agent falls silent; its server stays up, and its successor adopts it.
        server = postmaster_pid(guest) if postgres else None
        guest.kill()

        def silent():
            # Heartbeats published before the kill may still be on their way: wait for a
            # quiet spell of several heartbeat intervals.
            before = instance(guest.instance_id).last_heartbeat
            time.sleep(4 * HEARTBEAT_INTERVAL)
            return instance(guest.instance_id).last_heartbeat == before and before
        silent_since = wait_until(silent, timeout=60, interval=0, message="the heartbeats to stop")
        guest.start()
        wait_until(lambda: instance(guest.instance_id).last_heartbeat > silent_since, timeout=60,
                   interval=0.1, message="heartbeats again")
        assert wait_for_status(guest, "running")
        if postgres:
            assert postmaster_pid(guest) == server
        assert contents(guest.datastore) == rows

        guest.command("stop")
        assert guest.process.wait(timeout=30) == 0
        wait_for_status(guest, "shutdown")
        if postgres:
            assert not cluster_running(guest.datastore.pgdata)

        # The broken guest keeps saying so, and cannot back up what it does not have.
        previous = wait_for_status(broken, "failed to spawn").last_heartbeat
        wait_until(lambda: instance(broken.instance_id).last_heartbeat > previous, timeout=30,
                   message="another heartbeat of the broken guest")
        assert instance(broken.instance_id).service_status == "failed to spawn"
        failing_backup = make_backup(broken.instance_id)
        broken.command("backup", backup_id=failing_backup)
        failed = wait_until(lambda: (row := backup_row(failing_backup)).state == "FAILED" and row,
                            timeout=30, interval=0.1, message="a failed backup")
        assert "not prepared" in failed.fail_reason
    finally:
        for agent in (guest, restored, broken):
            agent.kill()
            if agent.log_path.exists():  # shown when the test fails
                print(f"--- agent {agent.instance_id}:\n{agent.log()}")
        worker.stop()

