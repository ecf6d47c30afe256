"""The operator's command line (manage.py) as real processes, always WITHOUT database access:
every command but ``db`` is a call to a real conductor worker, on the embedded default and
on RabbitMQ + PostgreSQL. No taskmanager runs here, so what the conductor hands it stays in
its queue: read back with kombu, each message's service signature checked.

One conductor per stack serves the whole module (a worker start costs seconds); each test
starts from empty tables and an empty taskmanager queue.
"""

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from kombu import Connection
from sqlalchemy import delete, inspect

import dbaas.broker
from dbaas import db, migrations, settings, signing, wire
from dbaas.models import Backup, Instance, Watermark
from dbaas.queues import queue
from tests.support.run import BackgroundRun, manage_py, processes_of, run_env
from tests.support.services import (AMQP_HOST, ROOT, PostgresDatabase, RabbitVhost, check_port,
                                    project_env, unavailable, wait_until)
from tests.support.stack import (SERVICE_KEY, Running, Stack, configure, instance_row,
                                 make_backup, snapshot)
from workers.taskmanager import api as taskmanager_api

VIEW_KEYS = {"id", "name", "project_id", "datastore", "status", "operating_status",
             "service_status", "task_status", "last_heartbeat", "fault"}
BACKUP_KEYS = {"id", "name", "description", "instance_id", "project_id", "state", "size",
               "checksum", "location", "backup_type", "fail_reason", "created", "updated"}
LOCATION = "file:///nowhere/backup"
NOWHERE = "postgresql://nobody@127.0.0.1:1/no-such-database"


# --- helpers -------------------------------------------------------------------------------

def assert_clean_failure(result: subprocess.CompletedProcess, lines: int | None = 1) -> str:
    """Non-zero exit, a short message on stderr, no traceback."""
    command = " ".join(result.args[1:])[:120]
    assert result.returncode != 0, (command, result.stdout)
    assert "Traceback" not in result.stderr + result.stdout, (command, result.stderr)
    message = result.stderr.strip()
    assert message, command
    if lines is not None:
        assert len(message.splitlines()) == lines, (command, message)
    return message


def ok(system: Running, *args: str):
    """Run a command that must succeed; its --json output decoded, if any."""
    result = system.cli(*args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, \
        result.stderr + system.conductor.log()[-3000:]
    return json.loads(result.stdout) if "--json" in args else result.stdout


def run_all(system: Running, commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:  # independent processes: side by side
        return list(pool.map(lambda args: system.cli(*args), commands))


def handed_over(broker_url: str) -> list[tuple[str, list]]:
    """Drain the taskmanager's queue: (task name, args) of each message, in order, after
    checking each is signed with the service key."""
    taken = []
    with Connection(broker_url) as connection, \
            connection.SimpleQueue(queue("trove-taskmanager")) as messages:
        while True:
            try:
                message = messages.get(timeout=0.5)
            except messages.Empty:
                return taken
            name, (args, kwargs, _embed) = message.headers["task"], message.payload
            signing.verify_service(SERVICE_KEY, message.headers[wire.AUTH_HEADER], name, args,
                                   kwargs, callee="taskmanager")
            assert kwargs == {}
            taken.append((name, args))
            message.ack()


def update_instance(instance_id: str, **fields) -> None:
    def work(session):
        instance = session.get(Instance, instance_id)
        for name, value in fields.items():
            setattr(instance, name, value)
    db.run_transaction(work)


def create(system: Running, name: str, *options: str) -> dict:
    return ok(system, "instance", "create", name, "--json", *options)


def make_active(system: Running, name: str = "db", *options: str) -> str:
    """An instance created through the CLI, then ACTIVE as its guest's heartbeat would make it."""
    instance_id = create(system, name, *options)["id"]
    update_instance(instance_id, task_status="NONE", service_status="running")
    return instance_id


def add_backup(instance_id: str, state: str, location: str | None = LOCATION,
               deleted: bool = False) -> str:
    moment = datetime(2030, 1, 1)
    return make_backup(instance_id, state=state, location=location, deleted=deleted,
                       created=moment, updated=moment)


# --- one conductor per stack, shared by the module -----------------------------------------

@pytest.fixture(scope="module", params=["embedded", "rabbitmq-postgresql"])
def system(request, tmp_path_factory):
    """A conductor on its own broker and migrated database; this process configured as the
    conductor (to arrange and check rows); the CLI runs without the database."""
    tmp_path = tmp_path_factory.mktemp(f"manage-{request.param}")
    postgres = vhost = None
    if request.param == "embedded":
        database_url = f"sqlite:///{tmp_path / 'control.sqlite3'}"
        broker_url = dbaas.broker.broker_url_for(str(tmp_path / "broker"))
    else:
        check_port(AMQP_HOST, "RabbitMQ")
        try:
            postgres = PostgresDatabase().create()
        except Exception as exc:  # any connection failure
            unavailable("PostgreSQL", exc)
        vhost = RabbitVhost().create()
        database_url, broker_url = postgres.url, vhost.url
    env = project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=database_url,
                      DBAAS_BROKER_URL=broker_url, DBAAS_SERVICE_KEY=SERVICE_KEY)
    patch = pytest.MonkeyPatch()
    running = None
    try:
        configure(patch, **{k: v for k, v in env.items() if k.startswith("DBAAS_")})
        migrations.upgrade()
        running = Running(Stack(request.param, database_url, broker_url, env, tmp_path, postgres), None)
        running.conductor.start()
        yield running
    finally:
        if running:
            running.stop()
        if db._engine is not None:
            db._engine.dispose()
        patch.undo()
        if postgres:
            postgres.drop()
        if vhost:
            vhost.drop()


@pytest.fixture
def cli(system) -> Running:
    """The shared system with empty tables and nothing waiting for the taskmanager."""
    def wipe(session):
        for model in (Watermark, Backup, Instance):
            session.execute(delete(model))
    db.run_transaction(wipe)
    handed_over(system.stack.broker_url)
    return system


# --- instance create / show / list ---------------------------------------------------------

def test_create_show_and_list(cli):
    first, second = create(cli, "first"), create(cli, "second", "--project", "tenant-7")
    assert VIEW_KEYS <= set(first)
    assert (second["name"], second["project_id"], first["project_id"]) == ("second", "tenant-7", "default")
    shown = ok(cli, "instance", "show", first["id"], "--json")
    assert {k: shown[k] for k in VIEW_KEYS} == {
        "id": first["id"], "name": "first", "project_id": "default", "datastore": "sqlite",
        "status": "BUILD", "operating_status": "", "service_status": None, "task_status": "BUILDING",
        "last_heartbeat": None, "fault": None}
    assert shown == first
    listed = ok(cli, "instance", "list", "--json")
    assert [view["id"] for view in listed] == [first["id"], second["id"]]
    assert all(VIEW_KEYS <= set(view) for view in listed)

    table = ok(cli, "instance", "list").splitlines()
    assert table[0].split() == ["id", "name", "datastore", "status", "operating_status", "last_heartbeat"]
    assert [line.split()[:4] for line in table[1:]] == [[first["id"], "first", "sqlite", "BUILD"],
                                                        [second["id"], "second", "sqlite", "BUILD"]]
    assert f"{'name':>20}  second" in ok(cli, "instance", "show", second["id"]).splitlines()

    # Recorded (BUILD) before being handed to the taskmanager, with its credentials' generation.
    assert instance_row(first["id"]).task_status == "BUILDING"
    assert handed_over(cli.stack.broker_url) == [
        (taskmanager_api.CREATE_INSTANCE, [first["id"], "sqlite", None, 1]),
        (taskmanager_api.CREATE_INSTANCE, [second["id"], "sqlite", None, 1])]


def test_show_reflects_heartbeats_and_faults(cli):
    instance_id = create(cli, "live")["id"]
    update_instance(instance_id, service_status="restart required", task_status="NONE",
                    last_heartbeat=datetime(2030, 1, 1, 12))
    shown = ok(cli, "instance", "show", instance_id, "--json")
    assert (shown["status"], shown["operating_status"], shown["service_status"], shown["last_heartbeat"]) == (
        "RESTART_REQUIRED", "RESTART_REQUIRED", "restart required", "2030-01-01T12:00:00Z")
    update_instance(instance_id, fault_kind="heartbeat_expired", fault_message="silent",
                    fault_at=datetime(2030, 1, 1, 12, 5))
    [listed] = ok(cli, "instance", "list", "--json")
    assert listed["status"] == "ERROR"
    assert listed["fault"] == {"kind": "heartbeat_expired", "message": "silent", "created": "2030-01-01T12:05:00Z"}


def test_deleted_instances_are_not_listed_or_shown(cli):
    instance_id = create(cli, "doomed")["id"]
    update_instance(instance_id, deleted=True)
    assert ok(cli, "instance", "list", "--json") == []
    message = assert_clean_failure(cli.cli("instance", "show", instance_id, "--json"))
    assert message == f"error: no instance {instance_id!r}"


INSTANCE_BAD_REQUESTS = {
    "unknown-id": (["instance", "show", str(uuid.uuid4()), "--json"], "no instance"),
    "garbage-id": (["instance", "show", "not-even-a-uuid"], "no instance 'not-even-a-uuid'"),
    "unknown-datastore": (["instance", "create", "x", "--datastore", "mysql", "--json"],
                          "unknown datastore 'mysql'; choose one of sqlite, postgresql"),
    "300-char-name": (["instance", "create", "n" * 300, "--json"], "instance name must be 1 to 255"),
    "blank-name": (["instance", "create", "   ", "--json"], "instance name must be"),
    "control-char": (["instance", "create", "line\nbreak", "--json"], "instance name must be"),
}


def test_bad_instance_requests_fail_with_one_line_and_record_nothing(cli):
    results = run_all(cli, [args for args, _ in INSTANCE_BAD_REQUESTS.values()])
    for (case, (_args, expected)), result in zip(INSTANCE_BAD_REQUESTS.items(), results):
        message = assert_clean_failure(result)
        assert result.returncode == 1 and result.stdout == "", case
        assert message.startswith("error:") and expected in message, (case, message)
    assert snapshot() == []
    assert handed_over(cli.stack.broker_url) == []
    assert not (Path(settings.get().var_dir) / "instances").exists()


# --- what is handed to the taskmanager -----------------------------------------------------

def test_delete_restart_and_backups_hand_over(cli):
    instance_id = make_active(cli)
    update_instance(instance_id, credential_generation=3)  # the record's generation is sent
    handed_over(cli.stack.broker_url)

    backup = ok(cli, "backup", "create", instance_id, "nightly", "--description", "before upgrade", "--json")
    assert BACKUP_KEYS <= set(backup)
    assert (backup["state"], backup["instance_id"], backup["name"], backup["description"]) == (
        "NEW", instance_id, "nightly", "before upgrade")
    assert ok(cli, "instance", "restart", instance_id) == f"restarting instance {instance_id}\n"
    assert ok(cli, "instance", "show", instance_id, "--json")["status"] == "REBOOT"
    completed = add_backup(instance_id, "COMPLETED")
    assert ok(cli, "backup", "delete", completed) == f"deleting backup {completed}\n"
    assert ok(cli, "instance", "delete", instance_id) == f"deleting instance {instance_id}\n"
    assert handed_over(cli.stack.broker_url) == [
        (taskmanager_api.CREATE_BACKUP, [backup["id"], instance_id, 3]),
        (taskmanager_api.RESTART_INSTANCE, [instance_id, 3, "sqlite"]),
        (taskmanager_api.DELETE_BACKUP, [completed, LOCATION]),
        (taskmanager_api.DELETE_INSTANCE, [instance_id, 3]),
    ]
    shown = ok(cli, "instance", "show", instance_id, "--json")
    assert (shown["task_status"], shown["status"]) == ("DELETING", "SHUTDOWN")
    # The backup in progress fails with its instance; the other is gone only when the
    # taskmanager reports it removed.
    assert [(b["id"], b["state"], b["fail_reason"]) for b in ok(cli, "backup", "list", "--json")] == [
        (backup["id"], "FAILED", "the instance was deleted"), (completed, "COMPLETED", None)]


def test_restore_takes_the_backups_datastore_and_location(cli):
    source = make_active(cli, "pg", "--datastore", "postgresql")
    backup_id = add_backup(source, "COMPLETED")
    handed_over(cli.stack.broker_url)
    copy = create(cli, "copy", "--restore-from", backup_id)
    assert (copy["datastore"], copy["status"]) == ("postgresql", "BUILD")
    assert handed_over(cli.stack.broker_url) == [
        (taskmanager_api.CREATE_INSTANCE, [copy["id"], "postgresql", LOCATION, 1])]


# --- backups -------------------------------------------------------------------------------

def test_backup_list_and_show(cli):
    instance_id, other = make_active(cli), make_active(cli, "other")
    first = add_backup(instance_id, "COMPLETED")
    second = add_backup(instance_id, "FAILED", location=None)
    add_backup(instance_id, "COMPLETED", deleted=True)
    of_other = add_backup(other, "COMPLETED")
    listed = ok(cli, "backup", "list", "--json")
    assert sorted(b["id"] for b in listed) == sorted([first, second, of_other])
    assert all(BACKUP_KEYS <= set(b) for b in listed)
    assert sorted(b["id"] for b in ok(cli, "backup", "list", "--instance", instance_id, "--json")) == \
        sorted([first, second])
    assert [b["id"] for b in ok(cli, "backup", "list", "--instance", other, "--json")] == [of_other]

    table = ok(cli, "backup", "list", "--instance", instance_id)
    assert table.splitlines()[0].split() == ["id", "name", "instance_id", "state", "size", "created"]
    assert first in table and second in table and of_other not in table
    shown = ok(cli, "backup", "show", first, "--json")
    assert (shown["state"], shown["location"], shown["created"]) == ("COMPLETED", LOCATION, "2030-01-01T00:00:00Z")
    assert f"{'state':>20}  COMPLETED" in ok(cli, "backup", "show", first).splitlines()


def test_backup_size_in_bytes_for_json_and_in_human_units_in_tables(cli):
    instance_id = make_active(cli)
    # The record holds Trove's size: GB (of 2**30 bytes) as a float.
    backup_id = make_backup(instance_id, state="COMPLETED", location=LOCATION, size=2_621_440 / 1024 ** 3)
    small = make_backup(instance_id, state="COMPLETED", location=LOCATION, size=4096 / 1024 ** 3)
    assert ok(cli, "backup", "show", backup_id, "--json")["size"] == 2_621_440
    assert {b["id"]: b["size"] for b in ok(cli, "backup", "list", "--json")} == {backup_id: 2_621_440, small: 4096}
    assert f"{'size':>20}  2.5 MiB" in ok(cli, "backup", "show", backup_id).splitlines()
    rows = ok(cli, "backup", "list").splitlines()
    assert "2.5 MiB" in next(row for row in rows if backup_id in row)
    assert "4.0 KiB" in next(row for row in rows if small in row)


# --- reset-status ----------------------------------------------------------------------------

def test_reset_status_says_what_it_cleared(cli):
    instance_id = create(cli, "stuck")["id"]
    update_instance(instance_id, fault_kind="build_timeout", fault_message="too slow",
                    fault_at=datetime(2030, 1, 1), service_status="restart required")
    said = ok(cli, "instance", "reset-status", instance_id).strip()
    assert said == (f"instance {instance_id}: cleared fault build_timeout (too slow); "
                    f"task_status BUILDING -> NONE; cleared service status 'restart required'")
    row = instance_row(instance_id)
    assert (row.fault_kind, row.fault_message, row.fault_at, row.task_status, row.service_status) == (
        None, None, None, "NONE", None)
    assert ok(cli, "instance", "reset-status", instance_id).strip() == \
        f"instance {instance_id}: nothing to reset"


def test_a_live_service_status_survives_reset(cli):
    instance_id = make_active(cli)
    assert ok(cli, "instance", "reset-status", instance_id).strip() == \
        f"instance {instance_id}: nothing to reset"
    assert ok(cli, "instance", "show", instance_id, "--json")["status"] == "ACTIVE"


# --- waiting -------------------------------------------------------------------------------

def test_wait_gives_up_after_its_timeout(cli):
    result = cli.cli("instance", "create", "slow", "--wait", "--timeout", "1", "--json")
    assert result.returncode == 1 and result.stdout == ""
    [instance_id] = [view["id"] for view in ok(cli, "instance", "list", "--json")]
    assert result.stderr.splitlines() == [f"instance {instance_id}: BUILD",
                                          f"error: instance {instance_id} still BUILD after 1s"]


def test_ctrl_c_while_waiting_exits_130(cli):
    process = subprocess.Popen([sys.executable, "manage.py", "instance", "create", "waiting", "--wait",
                                "--timeout", "120"], cwd=ROOT, env=cli.client_env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = process.stderr.readline()  # it is polling now
        assert first.endswith(": BUILD\n"), first
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert (stdout, stderr) == ("", "interrupted\n")


# --- one-line failures of the instance and backup lifecycle ----------------------------------

@pytest.fixture
def world(cli) -> dict:
    """An ACTIVE and a BUILD instance, and backups in several states."""
    active, building = make_active(cli, "active"), create(cli, "building")["id"]
    return {
        "active": active, "building": building,
        "new": add_backup(active, "NEW", location=None),
        "building-backup": add_backup(active, "BUILDING", location=None),
        "completed": add_backup(active, "COMPLETED"),
        "failed": add_backup(active, "FAILED", location=None),
        "deleted": add_backup(active, "COMPLETED", deleted=True),
    }


LIFECYCLE_BAD_REQUESTS = {
    "delete-unknown": (["instance", "delete", "{unknown}"], "no instance"),
    "restart-unknown": (["instance", "restart", "{unknown}"], "no instance"),
    "reset-unknown": (["instance", "reset-status", "not-a-uuid"], "no instance 'not-a-uuid'"),
    "backup-of-unknown": (["backup", "create", "{unknown}", "b"], "no instance"),
    "backup-of-building": (["backup", "create", "{building}", "b"],
                           "instance {building} is BUILD: only an ACTIVE instance can be backed up"),
    "backup-long-name": (["backup", "create", "{active}", "n" * 300], "backup name must be"),
    "backup-blank-name": (["backup", "create", "{active}", " "], "backup name must be"),
    "list-backups-of-unknown": (["backup", "list", "--instance", "{unknown}"], "no instance"),
    "show-unknown-backup": (["backup", "show", "{unknown}", "--json"], "no backup"),
    "show-deleted-backup": (["backup", "show", "{deleted}", "--json"], "no backup"),
    "delete-unknown-backup": (["backup", "delete", "{unknown}"], "no backup"),
    "delete-new-backup": (["backup", "delete", "{new}"], "backup {new} is NEW: wait until it is COMPLETED or FAILED"),
    "delete-running-backup": (["backup", "delete", "{building-backup}"], "is BUILDING: wait until"),
    "restore-unknown": (["instance", "create", "x", "--restore-from", "{unknown}"], "no backup"),
    "restore-new": (["instance", "create", "x", "--restore-from", "{new}"],
                    "backup {new} is NEW: only a COMPLETED backup can be restored"),
    "restore-failed": (["instance", "create", "x", "--restore-from", "{failed}"],
                       "is FAILED: only a COMPLETED backup"),
    "restore-deleted": (["instance", "create", "x", "--restore-from", "{deleted}"], "no backup"),
    "restore-other-datastore": (["instance", "create", "x", "--restore-from", "{completed}",
                                 "--datastore", "postgresql"], "is of a sqlite instance, not postgresql"),
    "restore-long-name": (["instance", "create", "n" * 300, "--restore-from", "{completed}"], "name"),
}


def test_bad_lifecycle_requests_fail_with_one_line_and_change_nothing(cli, world):
    handed_over(cli.stack.broker_url)
    ids = {**world, "unknown": str(uuid.uuid4())}
    before = snapshot()
    results = run_all(cli, [[arg.format(**ids) for arg in args] for args, _ in LIFECYCLE_BAD_REQUESTS.values()])
    for (case, (_args, expected)), result in zip(LIFECYCLE_BAD_REQUESTS.items(), results):
        message = assert_clean_failure(result)
        assert result.returncode == 1, case
        assert message.startswith("error:") and expected.format(**ids) in message, (case, message)
    assert snapshot() == before
    assert handed_over(cli.stack.broker_url) == []


# --- without a conductor, or before `db upgrade` ---------------------------------------------

def test_settings_prints_the_table(tmp_path):
    """Needs neither a conductor nor a broker."""
    env = project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=NOWHERE)
    result = subprocess.run([sys.executable, "manage.py", "settings"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == settings.markdown_table() + "\n"
    lines = result.stdout.splitlines()
    assert lines[:2] == ["| variable | default | used by | meaning |", "|---|---|---|---|"]
    assert [line.split("`")[1] for line in lines[2:]] == [option.env for option in settings.OPTIONS]


@pytest.mark.parametrize("args", [["instance", "create", "x", "--wait"],
                                  ["backup", "create", str(uuid.uuid4()), "nightly", "--wait"]],
                         ids=["instance", "backup"])
def test_timeout_must_be_more_than_zero(tmp_path, args):
    """Refused before anything is asked of a conductor (none runs here)."""
    env = project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=NOWHERE,
                      DBAAS_BROKER_URL=dbaas.broker.broker_url_for(str(tmp_path / "broker")))
    for value, reason in (("0", "must be more than 0 seconds"), ("-5", "must be more than 0 seconds"),
                          ("soon", "'soon' is not a number of seconds")):
        result = subprocess.run([sys.executable, "manage.py", *args, "--timeout", value], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
        message = assert_clean_failure(result, lines=None)
        assert result.returncode == 2
        usage, error = message.split("\n")[0], message.splitlines()[-1]
        assert usage.startswith(f"usage: python manage.py {args[0]} create")
        assert error == f"python manage.py {args[0]} create: error: argument --timeout: {reason}"
    assert not (tmp_path / "broker").exists()


def test_without_a_conductor_calls_fail_with_one_line_and_are_never_carried_out(stack):
    """No conductor consumes the broker: each call gives up after DBAAS_CALL_TIMEOUT with one
    line, and a conductor started afterwards never carries out what nobody waits for: the
    requests expire with the wait (RabbitMQ drops them; on the embedded broker the worker
    discards them)."""
    env = stack.client_env(DBAAS_CALL_TIMEOUT="0.5")
    commands = [["instance", "list", "--json"], ["instance", "show", str(uuid.uuid4())],
                ["instance", "create", "never", "--wait", "--json"],
                ["backup", "list", "--instance", str(uuid.uuid4())]]

    def run(args):
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, commands))
    for result in results:
        assert result.returncode == 1 and result.stdout == ""
        assert assert_clean_failure(result) == "error: no conductor answered within 0.5 s: is one running?"
    assert time.monotonic() - started < 30

    system = Running(stack, None)
    system.conductor.start()
    try:
        if stack.kind == "embedded":
            wait_until(lambda: system.conductor.log().count("Discarding revoked task") == len(commands),
                       timeout=60, message="the expired requests discarded")
        # Answered after whatever waited in the queue before it.
        assert ok(system, "instance", "list", "--json") == []
        assert snapshot() == []
        assert not re.search(r"conductor\.instance_create\[[^\]]+\] (succeeded|raised)", system.conductor.log())
    finally:
        system.stop()


def test_an_unreachable_broker_fails_with_one_line(tmp_path):
    env = project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=NOWHERE,
                      DBAAS_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")  # nothing listens there
    result = subprocess.run([sys.executable, "manage.py", "instance", "create", "x"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert assert_clean_failure(result).startswith("error: broker unreachable")


@pytest.fixture(params=["embedded", "rabbitmq-postgresql"])
def unmigrated(request, monkeypatch, tmp_path, env_for) -> Running:
    """A conductor on a database that `db upgrade` never ran on."""
    if request.param == "embedded":
        database_url = f"sqlite:///{tmp_path / 'control.sqlite3'}"
        broker_url = dbaas.broker.broker_url_for(str(tmp_path / "broker"))
        postgres = None
    else:
        postgres = request.getfixturevalue("postgres")
        database_url, broker_url = postgres.url, request.getfixturevalue("rabbit").url
    env = env_for(database_url, broker_url, DBAAS_CALL_TIMEOUT="3")
    configure(monkeypatch, **{k: v for k, v in env.items() if k.startswith("DBAAS_")})
    system = Running(Stack(request.param, database_url, broker_url, env, tmp_path, postgres), None)
    system.conductor.start()
    yield system
    system.stop()


def test_commands_before_db_upgrade_fail_with_one_line(unmigrated):
    message = assert_clean_failure(unmigrated.cli("instance", "list", "--json"))
    assert message == ("error: the control-plane database has no schema or an old one: "
                       "run `python manage.py db upgrade`")


# --- db: the one command that opens the database ---------------------------------------------

def test_db_upgrade_creates_the_schema_and_is_repeatable(database_url, tmp_path):
    env = project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=database_url,
                      DBAAS_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")  # needs no broker

    def manage(*args: str) -> str:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return result.stdout + result.stderr
    manage("db", "upgrade")
    head = ScriptDirectory.from_config(migrations.alembic_config()).get_current_head()
    engine = db.make_engine(database_url)
    try:
        assert {"instances", "backups", "watermarks", "alembic_version"} <= set(inspect(engine).get_table_names())
        assert "guest_credentials" not in inspect(engine).get_table_names()  # keys are derived now
        manage("db", "upgrade")
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [(head,)]
    finally:
        engine.dispose()
    assert f"{head} (head)" in manage("db", "current")


# --- system: what scripts/run started --------------------------------------------------------

def test_system_status_shows_the_run_and_system_stop_ends_it(tmp_path):
    env = run_env(tmp_path)
    run = BackgroundRun(env, tmp_path / "run.log")
    try:
        run.wait_up()
        status = json.loads(manage_py(env, "system", "status", "--json").stdout)
        live = processes_of(env["DBAAS_VAR_DIR"])
        assert set(status["processes"]) == {"conductor", "taskmanager", "beat", "flower"} | (
            {"api"} if "api" in status["processes"] else set())
        for name, process in status["processes"].items():
            assert process["running"] and process["pid"] in live, (name, live)
        assert [w.split("@")[0] for w in status["workers"]["conductor"]] == ["conductor"]
        assert [w.split("@")[0] for w in status["workers"]["taskmanager"]] == ["taskmanager"]
        assert set(status["queues"]) == {"trove-conductor", "trove-conductor-control", "trove-taskmanager"}
        assert all(isinstance(depth, int) for depth in status["queues"].values())
        assert status["instances"] == {"ACTIVE": 1}  # the demo
        assert status["errors"] == []

        lines = manage_py(env, "system", "status").stdout.splitlines()
        assert lines[0] == f"system of {env['DBAAS_VAR_DIR']}: running"
        assert f"  conductor    running, pid {status['processes']['conductor']['pid']}" in lines
        assert any(line.startswith("conductors answering: conductor@") for line in lines)
        assert any(line.startswith("queues: trove-conductor ") for line in lines)
        assert "instances: 1 ACTIVE" in lines

        stopped = manage_py(env, "system", "stop")
        assert stopped.returncode == 0 and "Traceback" not in stopped.stderr, stopped.stderr
        assert stopped.stdout.splitlines()[0].startswith(f"stopping the system of {env['DBAAS_VAR_DIR']}")
        run.process.wait(timeout=30)
        assert not processes_of(env["DBAAS_VAR_DIR"])
        after = manage_py(env, "system", "status").stdout.splitlines()
        assert after[0] == f"system of {env['DBAAS_VAR_DIR']}: not running (scripts/run starts it)"
        assert "conductors answering: none" in after
        assert "instances not counted: no conductor answers" in after
    finally:
        run.end()


def test_system_status_with_the_broker_unreachable_says_so_in_one_line(tmp_path):
    env = run_env(tmp_path, DBAAS_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    result = manage_py(env, "system", "status")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines()[0] == f"system of {env['DBAAS_VAR_DIR']}: not running (scripts/run starts it)"
    assert [line for line in result.stdout.splitlines() if "unreachable" in line] == [
        line for line in result.stdout.splitlines() if line.startswith("broker unreachable: ")]
    assert sum(line.startswith("broker unreachable: ") for line in result.stdout.splitlines()) == 1
