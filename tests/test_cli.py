"""The operator command line (manage.py) and the guest agent's, run as real processes."""

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest

from tests.support.services import ROOT, project_env

VIEW_KEYS = {"id", "name", "status", "operating_status", "service_status", "last_heartbeat", "fault"}


class Cli:
    def __init__(self, tmp_path: Path):
        self.var_dir = tmp_path / "var"
        self.db_path = self.var_dir / "cli.sqlite3"
        self.env = project_env(DBAAS_VAR_DIR=str(self.var_dir),
                               DBAAS_DATABASE_URL=f"sqlite:///{self.db_path}")

    def run(self, *args: str, module: str | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", module] if module else [sys.executable, "manage.py"]
        return subprocess.run(command + list(args), cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=60)

    def ok(self, *args: str):
        """Run a command that must succeed; its --json output decoded, if any."""
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return json.loads(result.stdout) if "--json" in args else result.stdout

    def create(self, name: str, *options: str) -> dict:
        return self.ok("instance", "create", name, "--json", *options)

    def sql(self, statement: str, *params):
        with closing(sqlite3.connect(self.db_path)) as connection, connection:
            return connection.execute(statement, params).fetchall()


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


@pytest.fixture
def cli(tmp_path) -> Cli:
    return Cli(tmp_path)


@pytest.fixture(scope="module")
def migrated_template(tmp_path_factory) -> Path:
    """One `db upgrade` per module; each test gets its own copy of the result."""
    template = Cli(tmp_path_factory.mktemp("template"))
    template.ok("db", "upgrade")
    return template.db_path


@pytest.fixture
def upgraded(cli, migrated_template) -> Cli:
    cli.var_dir.mkdir(parents=True)
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{migrated_template}{suffix}")
        if source.exists():
            shutil.copyfile(source, f"{cli.db_path}{suffix}")
    return cli


# --- db upgrade ----------------------------------------------------------------------------

def test_db_upgrade_creates_the_schema_and_is_repeatable(cli):
    cli.ok("db", "upgrade")
    tables = {name for (name,) in cli.sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"instances", "backups", "watermarks", "guest_credentials", "alembic_version"} <= tables
    cli.ok("db", "upgrade")
    assert cli.sql("SELECT version_num FROM alembic_version") == [("0001",)]


def test_commands_before_db_upgrade_fail_cleanly(cli):
    message = assert_clean_failure(cli.run("instance", "list", "--json"), lines=None)
    assert message.startswith("error:") and "db upgrade" in message


# --- instance create / show / list ---------------------------------------------------------

def test_instance_create_writes_an_owner_only_guest_config(upgraded):
    view = upgraded.create("orders-db")
    assert VIEW_KEYS <= set(view)
    path = Path(view["guest_config"])
    assert path == upgraded.var_dir.resolve() / "instances" / view["id"] / "guest.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = json.loads(path.read_text())
    assert config["instance_id"] == view["id"]
    assert config["broker_url"] == f"dbaasfs://{upgraded.var_dir.resolve() / 'broker'}"
    assert config["conductor_queue"] == "trove-conductor"
    # The file's secret is the live credential the conductor will verify against.
    assert upgraded.sql("SELECT secret FROM guest_credentials WHERE instance_id = ? AND revoked_at IS NULL",
                        view["id"]) == [(config["secret"],)]
    assert len(config["secret"]) >= 32


def test_instance_create_config_out(upgraded, tmp_path):
    target = tmp_path / "elsewhere" / "guest.json"
    view = upgraded.create("pg-1", "--datastore", "postgresql", "--config-out", str(target))
    assert view["datastore"] == "postgresql" and view["guest_config"] == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text())["instance_id"] == view["id"]


def test_new_instance_show_and_list(upgraded):
    first, second = upgraded.create("first"), upgraded.create("second")
    shown = upgraded.ok("instance", "show", first["id"], "--json")
    assert {k: shown[k] for k in VIEW_KEYS} == {
        "id": first["id"], "name": "first", "status": "BUILD", "operating_status": "",
        "service_status": None, "last_heartbeat": None, "fault": None}
    listed = upgraded.ok("instance", "list", "--json")
    assert [view["id"] for view in listed] == [first["id"], second["id"]]
    assert all(VIEW_KEYS <= set(view) for view in listed)
    table = upgraded.ok("instance", "list")
    assert first["id"] in table and second["id"] in table
    assert "second" in upgraded.ok("instance", "show", second["id"])


def test_show_reflects_heartbeats_and_faults(upgraded):
    instance_id = upgraded.create("live")["id"]
    upgraded.sql("UPDATE instances SET service_status = 'restart required', task_status = 'NONE', "
                 "last_heartbeat = '2030-01-01 12:00:00.000000' WHERE id = ?", instance_id)
    shown = upgraded.ok("instance", "show", instance_id, "--json")
    assert (shown["status"], shown["operating_status"], shown["service_status"], shown["last_heartbeat"]) == (
        "RESTART_REQUIRED", "RESTART_REQUIRED", "restart required", "2030-01-01T12:00:00Z")
    upgraded.sql("UPDATE instances SET fault_kind = 'heartbeat_expired', fault_message = 'silent', "
                 "fault_at = '2030-01-01 12:05:00.000000' WHERE id = ?", instance_id)
    [listed] = upgraded.ok("instance", "list", "--json")
    assert listed["status"] == "ERROR"
    assert listed["fault"] == {"kind": "heartbeat_expired", "message": "silent", "created": "2030-01-01T12:05:00Z"}


def test_deleted_instances_are_not_listed_or_shown(upgraded):
    instance_id = upgraded.create("doomed")["id"]
    upgraded.sql("UPDATE instances SET deleted = 1 WHERE id = ?", instance_id)
    assert upgraded.ok("instance", "list", "--json") == []
    assert_clean_failure(upgraded.run("instance", "show", instance_id, "--json"))


BAD_REQUESTS = {
    "unknown-id": (["instance", "show", str(uuid.uuid4()), "--json"], "no instance"),
    "garbage-id": (["instance", "show", "not-even-a-uuid"], "no instance"),
    "unknown-datastore": (["instance", "create", "x", "--datastore", "mysql", "--json"], "unknown datastore"),
    "300-char-name": (["instance", "create", "n" * 300, "--json"], "name"),
    "blank-name": (["instance", "create", "   ", "--json"], "name"),
    "control-char": (["instance", "create", "line\nbreak", "--json"], "name"),
}


def test_bad_requests_fail_with_one_line(upgraded):
    with ThreadPoolExecutor(max_workers=3) as pool:  # independent processes: run them side by side
        results = dict(zip(BAD_REQUESTS, pool.map(lambda case: upgraded.run(*case[0]), BAD_REQUESTS.values())))
    for case, result in results.items():
        message = assert_clean_failure(result)
        assert message.startswith("error:") and BAD_REQUESTS[case][1] in message, (case, message)
    assert upgraded.sql("SELECT count(*) FROM instances") == [(0,)]
    assert not (upgraded.var_dir / "instances").exists()


def test_unwritable_guest_config_fails_cleanly_and_records_nothing(upgraded, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = assert_clean_failure(upgraded.run("instance", "create", "x", "--config-out",
                                                str(blocker / "guest.json")))
    assert message.startswith("error:")
    assert upgraded.sql("SELECT count(*) FROM instances") == [(0,)]


# --- the guest agent's command line --------------------------------------------------------

def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize("content", [None, "{not json", '{"instance_id": "x"}', "[1, 2]"],
                         ids=["missing", "not-json", "missing-keys", "not-a-mapping"])
def test_guest_agent_with_a_bad_config_fails_cleanly(cli, tmp_path, content):
    path = tmp_path / "guest.json"
    if content is not None:
        write_config(path, content)
    result = cli.run("heartbeat", "--config", str(path), "--status", "running", module="workers.guestagent")
    message = assert_clean_failure(result)
    assert str(path) in message
