"""Guests hold no database credentials and no service key: their modules must not even import
the database layer, the control plane's settings (which read or make the service key) or
its roles (guests send by name, never by importing server code)."""

import json
import subprocess
import sys

import pytest

from tests.support.services import ROOT, project_env

FORBIDDEN = ("sqlalchemy", "psycopg2", "alembic", "dbaas.db", "dbaas.models", "dbaas.celery",
             "dbaas.settings", "dbaas.rpc", "workers.conductor", "workers.taskmanager")


def loaded_after(*modules: str) -> list[str]:
    """The modules a fresh interpreter has loaded after importing ``modules``."""
    script = "import json, sys\n" + "".join(f"import {m}\n" for m in modules) + \
             "print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=project_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def forbidden_in(loaded: list[str]) -> list[str]:
    return [name for name in loaded
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]


@pytest.mark.parametrize("modules", [
    ("workers.guestagent.client", "workers.guestagent.__main__", "workers.guestagent.agent"),
    ("workers.guestagent.config",),
    ("workers.guestagent.api",),
    ("dbaas.signing", "dbaas.wire", "dbaas.queues", "dbaas.broker"),
], ids=["agent", "config", "api", "shared-modules"])
def test_guest_modules_do_not_load_the_control_plane(modules):
    loaded = loaded_after(*modules)
    assert set(modules) <= set(loaded)
    assert forbidden_in(loaded) == []


def test_the_check_itself_sees_the_database_layer():
    """Guard against a vacuous pass: the control plane's modules are detected."""
    assert {"dbaas.db", "dbaas.models"} <= set(forbidden_in(loaded_after("dbaas.db", "dbaas.models")))
    assert {"dbaas.settings", "dbaas.rpc", "workers.conductor.api"} <= set(forbidden_in(
        loaded_after("workers.conductor.api")))
