"""The conductor is the single entry point for database work: every other process — the
taskmanager, beat, Flower, the CLI (but ``db``), guests — runs with a database URL that
leads nowhere and never even imports the database layer, and the whole lifecycle works."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.imports import guarded
from tests.support.services import ROOT, Beat, Process, Worker, wait_until
from tests.support.stack import Running


def test_the_guard_sees_an_import_even_when_it_is_swallowed(tmp_path):
    """Guard against a vacuous pass."""
    log = tmp_path / "imports.log"
    env = guarded({"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]}, log)
    subprocess.run([sys.executable, "-c", "try:\n import sqlalchemy\nexcept ImportError:\n pass"],
                   env=env, check=True, timeout=60)
    assert "imported sqlalchemy" in log.read_text()


def test_the_whole_lifecycle_with_only_the_conductor_holding_the_database(stack, tmp_path):
    imports = tmp_path / "imports.log"
    imports.touch()
    system = Running(stack, guest_command=None)
    system.client_env = guarded({**system.client_env, "DBAAS_SWEEP_INTERVAL": "1"}, imports)
    system.taskmanager = Worker(system.client_env, tmp_path / "taskmanager.log", queue="trove-taskmanager")
    system.start()
    beat = Beat(system.client_env, tmp_path)
    try:
        created = system.ok("instance", "create", "db1", "--wait", "--timeout", "120", "--json")
        assert created["status"] == "ACTIVE"
        instance_id = created["id"]
        assert system.ok("instance", "show", instance_id, "--json")["status"] == "ACTIVE"
        assert [i["id"] for i in system.ok("instance", "list", "--json")] == [instance_id]

        backup = system.ok("backup", "create", instance_id, "nightly", "--wait", "--timeout", "120", "--json")
        assert backup["state"] == "COMPLETED" and backup["size"] > 0
        assert system.ok("backup", "show", backup["id"], "--json")["checksum"] == backup["checksum"]
        assert [b["id"] for b in system.ok("backup", "list", "--json")] == [backup["id"]]

        copy = system.ok("instance", "create", "copy", "--restore-from", backup["id"], "--wait",
                         "--timeout", "120", "--json")
        assert copy["status"] == "ACTIVE" and copy["datastore"] == created["datastore"]

        assert f"restarting instance {instance_id}" in system.ok("instance", "restart", instance_id)
        wait_until(lambda: "command restart done" in
                   (Path(system.env["DBAAS_VAR_DIR"]) / "instances" / instance_id / "guest.log").read_text(),
                   timeout=60, message="the guest's restart")
        wait_until(lambda: system.ok("instance", "show", instance_id, "--json")["status"] == "ACTIVE",
                   timeout=60, message="ACTIVE after the restart")
        assert "nothing to reset" in system.ok("instance", "reset-status", instance_id)

        wait_until(lambda: re.search(r"conductor\.sweep\[[^\]]+\] succeeded", system.conductor.log()),
                   timeout=60, message="a sweep sent by beat")

        system.ok("backup", "delete", backup["id"])
        for doomed in (copy["id"], instance_id):
            system.ok("instance", "delete", doomed)
        wait_until(lambda: system.ok("instance", "list", "--json") == [], timeout=120,
                   message="both instances deleted")
        wait_until(lambda: system.ok("backup", "list", "--json") == [], timeout=60,
                   message="the backup deleted")
        assert imports.read_text() == ""
        assert beat.process.poll() is None, beat.log()
    finally:
        beat.stop()
        system.stop()


def test_flower_loads_no_database_layer(stack, tmp_path):
    imports = tmp_path / "imports.log"
    imports.touch()
    port = 20000 + os.getpid() % 10000
    env = guarded({**stack.client_env(), "FLOWER_UNAUTHENTICATED_API": "true"}, imports)
    flower = Process([sys.executable, "-m", "celery", "-A", "dbaas", "flower", f"--port={port}",
                      "--address=127.0.0.1"], env, tmp_path / "flower.log")
    try:
        wait_until(lambda: "Visit me at" in flower.log() or flower.process.poll() is not None,
                   timeout=60, message="Flower up")
        time.sleep(2)  # it inspects the broker once started
        assert flower.process.poll() is None, flower.log()
        assert imports.read_text() == ""
    finally:
        flower.stop()


@pytest.mark.parametrize("args", [
    ["instance", "list"], ["instance", "show", "x"], ["instance", "create", "x"],
    ["instance", "delete", "x"], ["instance", "restart", "x"], ["instance", "reset-status", "x"],
    ["backup", "list"], ["backup", "show", "x"], ["backup", "create", "x", "y"], ["backup", "delete", "x"],
    ["quota", "show", "x"], ["quota", "set", "x", "--instances", "1"], ["settings"], ["credentials", "list"],
    ["system", "status"], ["system", "stop"],
])
def test_no_cli_command_but_db_loads_the_database_layer(tmp_path, args):
    imports = tmp_path / "imports.log"
    imports.touch()
    env = guarded({"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"], "DBAAS_VAR_DIR": str(tmp_path),
                   "DBAAS_CALL_TIMEOUT": "0.5",
                   "DBAAS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/no-such-database"}, imports)
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr
    # These ask the conductor nothing (system status only once a conductor answers its ping).
    if args[0] not in ("settings", "credentials", "system"):
        assert result.stderr.strip() == "error: no conductor answered within 0.5 s: is one running?"
    assert imports.read_text() == ""


def test_procfile_gives_the_database_url_to_the_conductor_only():
    lines = [line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for name, command in lines:
        if name == "conductor":
            assert "-Q trove-conductor" in command
        else:
            assert command.strip().removeprefix("exec ").startswith("env -u DBAAS_DATABASE_URL "), (name, command)
    # scripts/run: only `manage.py db` keeps the URL; every other manage.py goes without.
    for line in (ROOT / "scripts" / "run").read_text().splitlines():
        if "python manage.py" in line and not line.lstrip().startswith(("#", "echo")) \
                and "manage.py db" not in line:
            assert "without_database python manage.py" in line, line
