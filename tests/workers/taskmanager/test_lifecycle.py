"""The whole system with real guest agents: manage.py (without the database) -> conductor
-> taskmanager -> guest agent -> conductor, for both datastores, as an operator sees it;
and nothing left behind."""

import glob
import json
import os
import shutil
import signal
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import pytest

from tests.support.services import wait_until
from tests.support.stack import configure, instance_row, processes_of
from workers.guestagent.datastores.postgresql import PostgresqlDatastore
from workers.taskmanager import guests
from workers.taskmanager.compute.local import instance_dir, instances_root

WAIT = ("--wait", "--timeout", "180", "--json")


def data_dir(instance_id: str) -> Path:
    return Path(instance_dir(instance_id)) / "data"


def processes_inside(directory: str) -> list[int]:
    """Processes working in ``directory`` (a postmaster works in its data directory)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if cwd == directory or cwd.startswith(directory + os.sep):
            found.append(int(name))
    return found


def create(system, name: str, *options: str) -> dict:
    result = system.cli("instance", "create", name, *options, *WAIT, timeout=240)
    assert result.returncode == 0, result.stderr + "".join(
        Path(log).read_text() for log in glob.glob(os.path.join(instances_root(), "*", "guest.log")))
    view = json.loads(result.stdout)
    assert view["status"] == "ACTIVE" and view["operating_status"] == "RUNNING"
    progress = result.stderr.splitlines()
    assert progress[0] == f"instance {view['id']}: BUILD" and progress[-1] == f"instance {view['id']}: ACTIVE"
    return view


def delete_all(system, instance_ids: list[str]) -> None:
    for instance_id in instance_ids:
        system.ok("instance", "delete", instance_id)
    for instance_id in instance_ids:
        wait_until(lambda: instance_row(instance_id).deleted, timeout=120, message="the instance deleted")
        directory = instance_dir(instance_id)
        assert processes_of(instance_id) == [] and processes_inside(directory) == []
        assert not Path(directory).exists()


def test_sqlite_create_backup_restore_restart_delete(start):
    system = start(None)
    source = create(system, "source")
    with closing(sqlite3.connect(data_dir(source["id"]) / "db.sqlite3")) as database, database:
        database.execute("create table kept (value text)")
        database.execute("insert into kept values ('from the source')")

    backup = system.ok("backup", "create", source["id"], "nightly", *WAIT)
    assert backup["state"] == "COMPLETED" and backup["backup_type"] == "sqlite-online"
    stored = Path(guests.backup_root()) / backup["id"]
    assert backup["location"] == stored.as_uri() and stored.is_file()

    copy = create(system, "copy", "--restore-from", backup["id"])
    assert copy["datastore"] == "sqlite"
    with closing(sqlite3.connect(data_dir(copy["id"]) / "db.sqlite3")) as database:
        assert database.execute("select value from kept").fetchall() == [("from the source",)]

    system.ok("instance", "restart", copy["id"])
    guest_log = Path(instance_dir(copy["id"])) / "guest.log"
    wait_until(lambda: "command restart" in guest_log.read_text(), timeout=60, message="the guest restarting")
    wait_until(lambda: system.ok("instance", "show", copy["id"], "--json")["status"] == "ACTIVE",
               timeout=60, message="ACTIVE after the restart")

    system.ok("backup", "delete", backup["id"])
    wait_until(lambda: system.ok("backup", "list", "--json") == [], timeout=60, message="the backup deleted")
    assert not stored.exists()
    delete_all(system, [source["id"], copy["id"]])


def postgres_server_programs() -> bool:
    # initdb refuses root; the guest runs it as the postgres user, which only root can do.
    return os.geteuid() == 0 and bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture
def reachable_var_dir(stack, monkeypatch):
    """A var dir the ``postgres`` OS user can reach (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="dbaas-var-")
    os.chmod(path, 0o711)
    configure(monkeypatch, DBAAS_VAR_DIR=path)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(not postgres_server_programs(), reason="needs root and PostgreSQL server programs")
def test_postgresql_restore_and_delete_with_an_orphaned_cluster(reachable_var_dir, start):
    system = start(None)
    source = create(system, "pg", "--datastore", "postgresql")
    server = PostgresqlDatastore(data_dir(source["id"]))
    assert (source["host"], source["port"]) == ("127.0.0.1", server.port)
    server.query("create table kept (value text); insert into kept values ('from the source')")

    backup = system.ok("backup", "create", source["id"], "nightly", *WAIT)
    assert backup["state"] == "COMPLETED" and backup["backup_type"] == "pg_dump"
    copy = create(system, "pg-copy", "--restore-from", backup["id"])
    assert copy["datastore"] == "postgresql" and copy["port"] != source["port"]
    assert PostgresqlDatastore(data_dir(copy["id"])).query("select value from kept") == "from the source"

    # The source's agent dies without stopping its cluster: the postmaster is orphaned.
    guest_pid = int((Path(instance_dir(source["id"])) / "guest.pid").read_text().split()[0])
    os.kill(guest_pid, signal.SIGKILL)
    wait_until(lambda: guest_pid not in processes_of(source["id"]), timeout=30, message="the agent gone")
    assert processes_inside(instance_dir(source["id"])), "no orphaned postmaster: test proves nothing"
    delete_all(system, [source["id"], copy["id"]])
