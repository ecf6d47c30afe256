"""The Procfile as `scripts/run` starts it (honcho, embedded default): an instance created
with manage.py — run without the database, as every command but `db` is — becomes ACTIVE
through the conductor, the taskmanager and a real guest, Flower answers behind basic
auth, and so does the REST API behind its credentials."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from tests.support.services import ROOT, project_env, wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flower(port: int, path: str, credentials: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except OSError:
        return 0, b""


def test_every_procfile_process_runs_and_an_instance_becomes_active(tmp_path):
    port, api_port, credentials = free_port(), free_port(), "operator:s3cret"
    # The Procfile names `celery` bare: it runs from the virtualenv's bin on PATH.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    env = project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_SWEEP_INTERVAL="1", PATH=path,
                      FLOWER_PORT=str(port), FLOWER_BASIC_AUTH=credentials, DBAAS_API_PORT=str(api_port),
                      DBAAS_DATABASE_URL=f"sqlite:///{tmp_path / 'var' / 'dbaas.sqlite3'}")
    # As a user runs it: the `celery` script does not put the project on sys.path.
    del env["PYTHONPATH"]

    def manage(*args: str) -> str:
        # Only `db` gets the database; every other command reaches it through the conductor.
        command_env = env if args[0] == "db" else \
            {**env, "DBAAS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/no-such-database"}
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=command_env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    manage("db", "upgrade")
    with open(tmp_path / "honcho.log", "wb") as log:
        honcho = subprocess.Popen([sys.executable, "-m", "honcho", "start"], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        view = json.loads(manage("instance", "create", "demo", "--wait", "--timeout", "120", "--json"))
        assert view["status"] == "ACTIVE"

        assert flower(port, "/api/workers")[0] == 401
        status, body = wait_until(lambda: (r := flower(port, "/api/workers?refresh=1", credentials))[0] == 200
                                  and r, timeout=60, message="Flower's worker list")
        assert {name.split("@")[0] for name in json.loads(body)} >= {"conductor", "taskmanager"}
        assert flower(port, "/healthcheck")[0] == 200  # public, for load balancers
        api = f"http://127.0.0.1:{api_port}"
        assert json.loads(urllib.request.urlopen(api + "/", timeout=10).read())["versions"][0]["id"] == "v1.0"
        assert flower(api_port, "/v1.0/demo/instances")[0] == 401

        manage("instance", "delete", view["id"])
        wait_until(lambda: not (tmp_path / "var" / "instances" / view["id"]).exists(), timeout=60,
                   message="the instance's directory removed")
        # The directory goes before the taskmanager reports the delete to the conductor.
        wait_until(lambda: manage("instance", "list", "--json").strip() == "[]", timeout=30,
                   message="the instance gone from the list")
        wait_until(lambda: "Sending due task timeout-sweep" in (tmp_path / "honcho.log").read_text(errors="replace"),
                   timeout=30, message="beat sending the sweep")
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        honcho.wait(timeout=30)
