"""The taskmanager as users run it: a real ``celery -A dbaas worker -Q trove-taskmanager``
next to a real conductor, driven through manage.py (without the database), on RabbitMQ +
PostgreSQL and on the embedded default. Guests are placeholder processes here
(DBAAS_GUEST_COMMAND), so what is checked is the taskmanager's own work: processes,
directories, records (through the conductor), commands sent."""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from dbaas import db
from dbaas.models import Backup
from tests.support.services import ROOT, wait_until
from tests.support.stack import guest_secret, instance_row, processes_of
from workers.guestagent import config as guest_config
from workers.guestagent.commands import command_queue, verify_command
from workers.taskmanager.compute.local import config_path, instance_dir


def take_commands(broker_url: str, instance_id: str, count: int) -> list[tuple[str, dict]]:
    """The next ``count`` commands waiting for the guest, each verified with the key derived
    for its instance (generation 1), which is also the one its config holds."""
    secret = guest_secret(instance_id)
    assert guest_config.load(config_path(instance_id)).secret == secret
    with Connection(broker_url) as connection, connection.SimpleQueue(command_queue(instance_id)) as queue:
        taken = []
        for _ in range(count):
            message = queue.get(timeout=30)
            taken.append(verify_command(secret, message.payload, message.headers))
            message.ack()
        with pytest.raises(queue.Empty):
            queue.get(timeout=1)
    return taken


def test_create_restart_delete(running):
    """Create records the endpoint and starts one guest however often it is delivered;
    restart reaches the guest; delete leaves no process and no directory."""
    view = running.ok("instance", "create", "orders", "--datastore", "postgresql", "--json")
    instance_id = view["id"]
    row = wait_until(lambda: (r := instance_row(instance_id)).port and r, timeout=60,
                     message="the endpoint recorded through the conductor")
    assert row.host == "127.0.0.1"
    wait_until(lambda: len(processes_of(instance_id)) == 1, timeout=30, message="the guest process")
    assert take_commands(running.stack.broker_url, instance_id, 1) == [("prepare", {"port": row.port, "host": row.host})]

    # Redelivery: the same request twice more; the guest is not started again.
    running.python(f"from dbaas.celery import app\n"
                   f"from workers.taskmanager.api import TaskmanagerAPI\n"
                   f"for _ in range(2):\n"
                   f"    TaskmanagerAPI(app).create_instance({instance_id!r}, 'postgresql', None, 1)")
    wait_until(lambda: running.handled("create_instance") == 3, timeout=60, message="three creates handled")
    assert len(processes_of(instance_id)) == 1
    assert take_commands(running.stack.broker_url, instance_id, 2) == [("prepare", {"port": row.port, "host": row.host})] * 2

    running.ok("instance", "restart", instance_id)
    wait_until(lambda: running.handled("restart_instance") == 1, timeout=60, message="the restart handled")
    assert take_commands(running.stack.broker_url, instance_id, 1) == [("restart", {})]

    assert running.ok("instance", "delete", instance_id).strip() == f"deleting instance {instance_id}"
    wait_until(lambda: instance_row(instance_id).deleted, timeout=60, message="the instance deleted")
    assert processes_of(instance_id) == []
    assert not Path(instance_dir(instance_id)).exists()
    assert running.ok("instance", "list", "--json") == []


def test_a_guest_that_cannot_start_puts_the_instance_in_error(start):
    running = start([sys.executable, "-c", "import sys; print('cannot start'); sys.exit(3)"])
    result = running.cli("instance", "create", "broken", "--wait", "--timeout", "60", "--json")
    assert result.returncode == 1, result.stderr
    view = json.loads(result.stdout)
    assert view["status"] == "ERROR" and view["fault"]["kind"] == "provisioning_failed"
    assert "exited at once with status 3: cannot start" in view["fault"]["message"]
    # Each change once, as --wait saw it: the guest may fail before the first look.
    lines = result.stderr.strip().splitlines()
    assert lines[:-1] in ([f"instance {view['id']}: BUILD", f"instance {view['id']}: ERROR"],
                          [f"instance {view['id']}: ERROR"]), lines
    assert lines[-1] == f"error: instance {view['id']} is ERROR: {view['fault']['message']}"

    reset = running.ok("instance", "reset-status", view["id"])
    assert "cleared fault provisioning_failed" in reset and "task_status BUILDING -> NONE" in reset
    assert running.ok("instance", "show", view["id"], "--json")["fault"] is None


def test_a_backup_no_guest_will_take_fails_and_can_be_deleted(running):
    # The guest process dies; a heartbeat sent by hand with its config makes the instance
    # ACTIVE all the same, but nothing runs to take the backup.
    instance_id = running.ok("instance", "create", "orphan", "--json")["id"]
    wait_until(lambda: running.handled("create_instance") == 1, timeout=60, message="the create handled")
    [pid] = processes_of(instance_id)
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not processes_of(instance_id), timeout=30, message="the guest gone")
    subprocess.run([sys.executable, "-m", "workers.guestagent", "heartbeat", "--config",
                    config_path(instance_id), "--status", "running"],
                   cwd=ROOT, env=running.client_env, check=True, timeout=60)
    wait_until(lambda: running.ok("instance", "show", instance_id, "--json")["status"] == "ACTIVE",
               timeout=60, message="the instance ACTIVE")

    result = running.cli("backup", "create", instance_id, "nightly", "--wait", "--timeout", "60", "--json")
    assert result.returncode == 1, result.stderr
    backup = json.loads(result.stdout)
    assert backup["state"] == "FAILED"
    assert backup["fail_reason"] == f"no guest agent runs for instance {instance_id}"
    assert result.stderr.strip().splitlines()[-1] == f"error: backup {backup['id']} FAILED: {backup['fail_reason']}"
    assert [b["id"] for b in running.ok("backup", "list", "--json")] == [backup["id"]]

    running.ok("backup", "delete", backup["id"])
    wait_until(lambda: running.ok("backup", "list", "--json") == [], timeout=60, message="the backup deleted")
    with db.session_scope() as session:
        assert session.get(Backup, backup["id"]).deleted


def test_only_the_control_plane_may_call_the_taskmanager(running):
    instance_id = running.ok("instance", "create", "victim", "--json")["id"]
    wait_until(lambda: running.handled("create_instance") == 1, timeout=60, message="the create handled")
    secret = guest_config.load(config_path(instance_id)).secret
    # A process holding the guest's key only, publishing straight to the taskmanager's queue
    # (a broker may let it) with a plain Celery app: nothing of the control plane loaded.
    # Each forgery, by its message id, and a word of why it must be refused.
    forgeries = {str(uuid.uuid4()): reason for reason in
                 ("may not call", "signature does not verify", "dbaas_auth")}
    running.python(f"""
import sys
from celery import Celery
import dbaas.broker
from dbaas import signing, wire
from dbaas.queues import queue
app = Celery("intruder", broker={running.stack.broker_url!r}, set_as_current=False)
app.conf.task_serializer = "json"
name, args = "taskmanager.delete_instance", [{instance_id!r}]
headers = (signing.auth_header(signing.instance_principal(args[0]), {secret!r}, name, args, {{}},
                               generation=1),
           signing.auth_header(signing.SERVICE_PRINCIPAL, {secret!r}, name, args, {{}}),
           None)
for task_id, header in zip({list(forgeries)!r}, headers):
    app.send_task(name, args=args, queue=queue("trove-taskmanager"), task_id=task_id,
                  headers={{wire.AUTH_HEADER: header}} if header else {{}})
app.close()
assert not {{"dbaas.celery", "dbaas.settings", "dbaas.rpc"}} & set(sys.modules)
""")

    def said_about(task_id: str) -> list[str]:
        return [line for line in running.taskmanager.log().splitlines() if task_id in line]
    wait_until(lambda: all(any(reason in line for line in said_about(task_id))
                           for task_id, reason in forgeries.items()),
               timeout=60, message="three refusals, each for its reason")
    assert not [line for task_id in forgeries for line in said_about(task_id) if "succeeded" in line]
    assert len(processes_of(instance_id)) == 1
    assert Path(instance_dir(instance_id)).exists()


def test_guests_outlive_the_taskmanager(running):
    instance_id = running.ok("instance", "create", "db", "--json")["id"]
    wait_until(lambda: running.handled("create_instance") == 1, timeout=60, message="the create handled")
    [pid] = processes_of(instance_id)
    running.taskmanager.kill()
    assert processes_of(instance_id) == [pid]
    assert os.getsid(pid) == pid
