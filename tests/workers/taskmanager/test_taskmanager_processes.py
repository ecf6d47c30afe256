"""The taskmanager as users run it: a real ``celery -A dbaas worker -Q trove-taskmanager``
next to a real conductor, driven through manage.py, on RabbitMQ + PostgreSQL and on the
embedded default. Guests are placeholder processes here (DBAAS_GUEST_COMMAND), so what is
checked is the taskmanager's own work: processes, directories, records, commands sent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kombu import Connection

from dbaas import db
from dbaas.models import Backup
from tests.support.services import ROOT, wait_until
from tests.support.stack import instance_row, processes_of
from workers.guestagent import config as guest_config
from workers.guestagent.commands import command_queue, verify_command
from workers.taskmanager import guests


def take_commands(broker_url: str, instance_id: str, count: int) -> list[tuple[str, dict]]:
    """The next ``count`` commands waiting for the guest, each verified with its secret."""
    secret = guest_config.load(guests.config_path(instance_id)).secret
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
    assert take_commands(running.stack.broker_url, instance_id, 1) == [("prepare", {"port": row.port})]

    # Redelivery: the same request twice more; the guest is not started again.
    running.python(f"from workers.taskmanager import api\n"
                   f"for _ in range(2): api.create_instance({instance_id!r}, 'postgresql', None)")
    wait_until(lambda: running.handled("create_instance") == 3, timeout=60, message="three creates handled")
    assert len(processes_of(instance_id)) == 1
    assert take_commands(running.stack.broker_url, instance_id, 2) == [("prepare", {"port": row.port})] * 2

    running.ok("instance", "restart", instance_id)
    wait_until(lambda: running.handled("restart_instance") == 1, timeout=60, message="the restart handled")
    assert take_commands(running.stack.broker_url, instance_id, 1) == [("restart", {})]

    assert "deleting" in running.ok("instance", "delete", instance_id)
    wait_until(lambda: instance_row(instance_id).deleted, timeout=60, message="the instance deleted")
    assert processes_of(instance_id) == []
    assert not Path(guests.instance_dir(instance_id)).exists()
    assert running.ok("instance", "list", "--json") == []


def test_a_guest_that_cannot_start_puts_the_instance_in_error(start):
    running = start([sys.executable, "-c", "import sys; print('cannot start'); sys.exit(3)"])
    result = running.cli("instance", "create", "broken", "--wait", "--timeout", "60", "--json")
    assert result.returncode == 1, result.stderr
    view = json.loads(result.stdout)
    assert view["status"] == "ERROR" and view["fault"]["kind"] == "provisioning_failed"
    assert "exited at once with status 3: cannot start" in view["fault"]["message"]
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"instance {view['id']}: BUILD"
    assert lines[-2:] == [f"instance {view['id']}: ERROR",
                          f"error: instance {view['id']} is ERROR: {view['fault']['message']}"]

    reset = running.ok("instance", "reset-status", view["id"])
    assert "cleared fault provisioning_failed" in reset and "task_status BUILDING -> NONE" in reset
    assert running.ok("instance", "show", view["id"], "--json")["fault"] is None


def test_a_backup_no_guest_will_take_fails_and_can_be_deleted(running, tmp_path):
    # A guest run by hand (--config-out): the taskmanager starts nothing for it.
    config = tmp_path / "manual" / "guest.json"
    instance_id = running.ok("instance", "create", "manual", "--config-out", str(config), "--json")["id"]
    subprocess.run([sys.executable, "-m", "workers.guestagent", "heartbeat", "--config", str(config),
                    "--status", "running"], cwd=ROOT, env=running.env, check=True, timeout=60)
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
    secret = guest_config.load(guests.config_path(instance_id)).secret
    # A guest's own process: one that loaded dbaas.celery would sign anything it publishes.
    running.python(f"""
import sys
from dbaas import signing, wire
from workers.guestagent.client import guest_app
app = guest_app({running.stack.broker_url!r}, "trove-conductor")
name, args = "taskmanager.delete_instance", [{instance_id!r}]
for header in (signing.auth_header(signing.instance_principal(args[0]), {secret!r}, name, args, {{}}),
               signing.auth_header(signing.SERVICE_PRINCIPAL, {secret!r}, name, args, {{}}),
               None):
    app.send_task(name, args=args, queue="trove-taskmanager",
                  headers={{wire.AUTH_HEADER: header}} if header else {{}})
app.close()
assert "dbaas.celery" not in sys.modules
""")
    wait_until(lambda: running.taskmanager.log().count("rejected taskmanager.delete_instance") == 3,
               timeout=60, message="three refusals")
    assert "may not call the taskmanager" in running.taskmanager.log()
    assert "signature does not verify" in running.taskmanager.log()
    assert "missing or malformed dbaas_auth header" in running.taskmanager.log()
    assert len(processes_of(instance_id)) == 1
    assert Path(guests.instance_dir(instance_id)).exists()


def test_guests_outlive_the_taskmanager(running):
    instance_id = running.ok("instance", "create", "db", "--json")["id"]
    wait_until(lambda: running.handled("create_instance") == 1, timeout=60, message="the create handled")
    [pid] = processes_of(instance_id)
    running.taskmanager.kill()
    assert processes_of(instance_id) == [pid]
    assert os.getsid(pid) == pid
