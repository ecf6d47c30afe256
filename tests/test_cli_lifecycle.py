"""manage.py's lifecycle commands as real processes, without workers: what each records,
what it hands the taskmanager (read back from the embedded broker, signature checked), and
clean one-line failures for bad input."""

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kombu import Connection

import dbaas.broker
from dbaas import signing, wire
from dbaas.queues import queue
from tests.test_cli import Cli, assert_clean_failure, cli, migrated_template, upgraded  # noqa: F401  (fixtures)

LOCATION = "file:///nowhere/backup"


def handed_over(cli: Cli) -> list[tuple[str, list]]:
    """Drain the taskmanager's queue: (task name, args) of each message, in order, after
    checking each is signed with the service key."""
    service_key = (cli.var_dir / "service.key").read_text().strip()
    taken = []
    with Connection(dbaas.broker.broker_url_for(cli.var_dir / "broker")) as connection, \
            connection.SimpleQueue(queue("trove-taskmanager")) as messages:
        while True:
            try:
                message = messages.get(timeout=0.5)
            except messages.Empty:
                return taken
            name, (args, kwargs, _embed) = message.headers["task"], message.payload
            principal, digest = signing.parse_header(message.headers[wire.AUTH_HEADER])
            assert principal == signing.SERVICE_PRINCIPAL
            signing.verify(service_key, digest, name, args, kwargs)
            taken.append((name, args))
            message.ack()


def make_active(cli: Cli, name: str = "db", *options: str) -> str:
    instance_id = cli.create(name, *options)["id"]
    cli.sql("UPDATE instances SET task_status = 'NONE', service_status = 'running' WHERE id = ?", instance_id)
    return instance_id


def add_backup(cli: Cli, instance_id: str, state: str, location: str | None = LOCATION,
               deleted: bool = False) -> str:
    backup_id = str(uuid.uuid4())
    cli.sql("INSERT INTO backups (id, instance_id, tenant_id, name, state, location, created, updated, deleted) "
            "VALUES (?, ?, 'default', 'b', ?, ?, '2030-01-01 00:00:00', '2030-01-01 00:00:00', ?)",
            backup_id, instance_id, state, location, deleted)
    return backup_id


def test_create_hands_over_after_recording_and_config_out_does_not(upgraded):
    view = upgraded.create("built")
    assert upgraded.sql("SELECT task_status FROM instances WHERE id = ?", view["id"]) == [("BUILDING",)]
    upgraded.create("by-hand", "--config-out", str(upgraded.var_dir / "elsewhere.json"))
    assert handed_over(upgraded) == [("taskmanager.create_instance", [view["id"], "sqlite", None])]


def test_delete_restart_and_backups_hand_over(upgraded):
    instance_id = make_active(upgraded)
    handed_over(upgraded)

    assert upgraded.ok("instance", "restart", instance_id).strip() == f"restarting instance {instance_id}"
    backup = upgraded.ok("backup", "create", instance_id, "nightly", "--description", "before upgrade", "--json")
    assert (backup["state"], backup["instance_id"], backup["name"]) == ("NEW", instance_id, "nightly")
    completed = add_backup(upgraded, instance_id, "COMPLETED")
    upgraded.ok("backup", "delete", completed)
    upgraded.ok("instance", "delete", instance_id)
    assert handed_over(upgraded) == [
        ("taskmanager.restart_instance", [instance_id]),
        ("taskmanager.create_backup", [backup["id"], instance_id]),
        ("taskmanager.delete_backup", [completed, LOCATION]),
        ("taskmanager.delete_instance", [instance_id]),
    ]
    shown = upgraded.ok("instance", "show", instance_id, "--json")
    assert (shown["task_status"], shown["status"]) == ("DELETING", "SHUTDOWN")


def test_restore_takes_the_backups_datastore_and_location(upgraded):
    source = make_active(upgraded, "pg", "--datastore", "postgresql")
    backup_id = add_backup(upgraded, source, "COMPLETED")
    handed_over(upgraded)
    copy = upgraded.create("copy", "--restore-from", backup_id)
    assert copy["datastore"] == "postgresql"
    assert json.loads(Path(copy["guest_config"]).read_text())["datastore"] == "postgresql"
    assert handed_over(upgraded) == [("taskmanager.create_instance", [copy["id"], "postgresql", LOCATION])]


def test_backup_list_and_show(upgraded):
    instance_id = make_active(upgraded)
    first = add_backup(upgraded, instance_id, "COMPLETED")
    second = add_backup(upgraded, instance_id, "FAILED", location=None)
    add_backup(upgraded, instance_id, "COMPLETED", deleted=True)
    listed = upgraded.ok("backup", "list", "--json")
    assert sorted(b["id"] for b in listed) == sorted([first, second])
    assert {"id", "name", "instance_id", "state", "size", "checksum", "location", "backup_type",
            "fail_reason", "created", "updated"} <= set(listed[0])
    table = upgraded.ok("backup", "list")
    assert table.splitlines()[0].split() == ["id", "name", "instance_id", "state", "size", "created"]
    assert first in table and second in table
    shown = upgraded.ok("backup", "show", first, "--json")
    assert (shown["state"], shown["location"], shown["created"]) == ("COMPLETED", LOCATION, "2030-01-01T00:00:00Z")
    assert first in upgraded.ok("backup", "show", first)


def test_reset_status_says_what_it_cleared(upgraded):
    instance_id = upgraded.create("stuck")["id"]
    upgraded.sql("UPDATE instances SET fault_kind = 'build_timeout', fault_message = 'too slow', "
                 "fault_at = '2030-01-01 00:00:00', service_status = 'restart required' WHERE id = ?",
                 instance_id)
    said = upgraded.ok("instance", "reset-status", instance_id).strip()
    assert said == (f"instance {instance_id}: cleared fault build_timeout (too slow); "
                    f"task_status BUILDING -> NONE; cleared service status 'restart required'")
    assert upgraded.sql("SELECT fault_kind, fault_message, fault_at, task_status, service_status "
                        "FROM instances WHERE id = ?", instance_id) == [(None, None, None, "NONE", None)]
    assert upgraded.ok("instance", "reset-status", instance_id).strip() == \
        f"instance {instance_id}: nothing to reset"


def test_a_live_service_status_survives_reset(upgraded):
    instance_id = make_active(upgraded)
    upgraded.ok("instance", "reset-status", instance_id)
    assert upgraded.ok("instance", "show", instance_id, "--json")["status"] == "ACTIVE"


def test_wait_gives_up_after_its_timeout(upgraded):
    result = upgraded.run("instance", "create", "slow", "--wait", "--timeout", "1", "--json")
    assert result.returncode == 1 and result.stdout == ""
    [instance_id] = [row[0] for row in upgraded.sql("SELECT id FROM instances")]
    assert result.stderr.splitlines() == [f"instance {instance_id}: BUILD",
                                          f"error: instance {instance_id} still BUILD after 1s"]


def test_unreachable_broker_fails_cleanly(upgraded):
    upgraded.env["DBAAS_BROKER_URL"] = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens there
    message = assert_clean_failure(upgraded.run("instance", "create", "x"))
    assert message.startswith("error: broker unreachable")


@pytest.fixture
def world(upgraded) -> dict:
    """An ACTIVE and a BUILD instance, and backups in several states."""
    active, building = make_active(upgraded, "active"), upgraded.create("building")["id"]
    return {
        "active": active, "building": building,
        "new": add_backup(upgraded, active, "NEW", location=None),
        "building-backup": add_backup(upgraded, active, "BUILDING", location=None),
        "completed": add_backup(upgraded, active, "COMPLETED"),
        "deleted": add_backup(upgraded, active, "COMPLETED", deleted=True),
    }


BAD_REQUESTS = {
    "delete-unknown": (["instance", "delete", "{unknown}"], "no instance"),
    "restart-unknown": (["instance", "restart", "{unknown}"], "no instance"),
    "reset-unknown": (["instance", "reset-status", "not-a-uuid"], "no instance"),
    "backup-of-unknown": (["backup", "create", "{unknown}", "b"], "no instance"),
    "backup-of-building": (["backup", "create", "{building}", "b"], "is BUILD: only an ACTIVE instance"),
    "backup-long-name": (["backup", "create", "{active}", "n" * 300], "backup name must be"),
    "show-unknown-backup": (["backup", "show", "{unknown}", "--json"], "no backup"),
    "delete-unknown-backup": (["backup", "delete", "{unknown}"], "no backup"),
    "delete-running-backup": (["backup", "delete", "{building-backup}"], "is BUILDING: wait until"),
    "restore-unknown": (["instance", "create", "x", "--restore-from", "{unknown}"], "no backup"),
    "restore-new": (["instance", "create", "x", "--restore-from", "{new}"], "is NEW: only a COMPLETED backup"),
    "restore-deleted": (["instance", "create", "x", "--restore-from", "{deleted}"], "no backup"),
    "restore-other-datastore": (["instance", "create", "x", "--restore-from", "{completed}",
                                 "--datastore", "postgresql"], "is of a sqlite instance, not postgresql"),
    "restore-by-hand": (["instance", "create", "x", "--restore-from", "{completed}", "--config-out", "/tmp/x.json"],
                        "--restore-from needs the taskmanager"),
    "restore-long-name": (["instance", "create", "n" * 300, "--restore-from", "{completed}"], "name"),
}


def test_bad_requests_fail_with_one_line(upgraded, world):
    handed_over(upgraded)
    ids = {**world, "unknown": str(uuid.uuid4())}
    before = upgraded.sql("SELECT id, task_status, deleted FROM instances ORDER BY id"), \
        upgraded.sql("SELECT id, state, deleted FROM backups ORDER BY id")
    with ThreadPoolExecutor(max_workers=3) as pool:  # independent processes: run them side by side
        results = pool.map(lambda case: upgraded.run(*(arg.format(**ids) for arg in case[0])),
                           BAD_REQUESTS.values())
    for (case, (_args, expected)), result in zip(BAD_REQUESTS.items(), results):
        message = assert_clean_failure(result)
        assert message.startswith("error:") and expected in message, (case, message)
    after = upgraded.sql("SELECT id, task_status, deleted FROM instances ORDER BY id"), \
        upgraded.sql("SELECT id, state, deleted FROM backups ORDER BY id")
    assert after == before
    assert handed_over(upgraded) == []
