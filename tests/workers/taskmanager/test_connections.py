"""How a client connects, as an operator finds out: ``instance show`` says where, the create
shows the administrator's password once, ``reset-password`` makes a new one; psql, the
real client program, connects with it and only with it."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.services import wait_until
from tests.workers.taskmanager.test_lifecycle import (create, postgres_server_programs,  # noqa: F401
                                                      reachable_var_dir)
from workers.guestagent.datastores.postgresql import bin_dir
from workers.taskmanager.compute.local import instance_dir


def psql(connection: dict, password: str | None) -> subprocess.CompletedProcess:
    """psql as the README says to run it; never prompting (-w)."""
    env = {"PATH": os.environ["PATH"], **({"PGPASSWORD": password} if password is not None else {})}
    return subprocess.run([os.path.join(bin_dir(), "psql"), "-w", "-h", connection["host"],
                           "-p", str(connection["port"]), "-U", connection["user"], "-d", connection["database"],
                           "-tAc", "select current_user"], env=env, capture_output=True, text=True, timeout=30)


def test_a_sqlite_instance_shows_its_file(start):
    system = start(None)
    view = create(system, "file")
    path = Path(instance_dir(view["id"])) / "data" / "db.sqlite3"
    assert view["connection"] == {"path": str(path)} and path.is_file()
    assert "password" not in view
    assert f"{'connection':>20}  path={path}" in system.ok("instance", "show", view["id"]).splitlines()
    result = system.cli("instance", "reset-password", view["id"])
    assert result.returncode == 1
    assert result.stderr == "error: a sqlite instance has no users: clients open its file\n"


@pytest.mark.skipif(not postgres_server_programs(), reason="needs root and PostgreSQL server programs")
def test_psql_connects_with_the_password_shown_once_and_only_with_it(reachable_var_dir, start):
    system = start(None)
    view = create(system, "pg", "--datastore", "postgresql")
    connection, password = view["connection"], view["password"]
    assert connection == {"host": "127.0.0.1", "port": view["port"], "user": "admin", "database": "postgres"}
    assert len(password) == 32

    assert psql(connection, password).stdout.strip() == "admin"
    for wrong in (None, "", "not-the-password", password[:-1]):
        refused = psql(connection, wrong)
        assert refused.returncode != 0 and refused.stdout == "", wrong
    assert "password authentication failed" in psql(connection, "not-the-password").stderr
    assert "no password supplied" in psql(connection, None).stderr

    # Shown once: never again by show or list.
    shown = system.ok("instance", "show", view["id"])
    assert password not in shown + system.ok("instance", "list") + system.cli("instance", "show", view["id"], "--json").stdout
    assert f"{'connection':>20}  host=127.0.0.1 port={view['port']} user=admin database=postgres" in shown.splitlines()

    reset = system.ok("instance", "reset-password", view["id"], "--json")
    assert (reset["id"], reset["user"]) == (view["id"], "admin")
    assert reset["password"] not in (password, None)
    wait_until(lambda: psql(connection, reset["password"]).returncode == 0, timeout=30,
               message="the new password set by the guest")
    assert psql(connection, password).returncode != 0
    table = system.ok("instance", "reset-password", view["id"]).splitlines()
    assert [line.split() for line in table[1:]] == [["user", "admin"], ["password", table[2].split()[1]]]
    assert table[2].split()[1] != reset["password"]
