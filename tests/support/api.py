"""The REST API process for a test (``python -m workers.api``, as the Procfile runs it:
without the database, here under the import guard), its credentials, and the clients
tenants use: python-troveclient on a keystoneauth1 session, and the openstack CLI."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.support.imports import guarded
from tests.support.services import ROOT, stop_group
from workers.api.credentials import hash_password, token_digest

OPENSTACK = str(Path(sys.executable).parent / "openstack")

# name -> (password, project, admin); and the tokens. Shared by every API test.
USERS = {"alice": ("alice-password", "alpha", False), "bob": ("bob-password", "beta", False),
         "root": ("root-password", "ops", True)}
TOKENS = {"alpha-token-0123456789abcdef": ("alpha", False)}


def credentials_document() -> str:
    return json.dumps({
        "users": [{"name": name, "password": hash_password(password), "project": project, "admin": admin}
                  for name, (password, project, admin) in USERS.items()],
        "tokens": [{"name": f"token-{project}", "sha256": token_digest(token), "project": project,
                    "admin": admin} for token, (project, admin) in TOKENS.items()],
    })


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ApiServer:
    def __init__(self, env: dict, tmp_path: Path, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"api-{self.port}.log"
        self.imports = tmp_path / f"api-{self.port}-imports.log"
        self.imports.touch()
        self.env = guarded({k: v for k, v in env.items() if k != "DBAAS_DATABASE_URL"}, self.imports)
        self.env.update({"DBAAS_API_PORT": str(self.port), "DBAAS_API_CREDENTIALS": credentials_document(),
                         **settings})
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "ApiServer":
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "workers.api"], cwd=ROOT, env=self.env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited early:\n{self.log()}")
            try:
                if requests.get(self.url + "/", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not answer in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process:
            stop_group(self.process)

    def endpoint(self, project: str) -> str:
        return f"{self.url}/v1.0/{project}"

    # --- clients -------------------------------------------------------------------------

    def session(self, user: str | None = None, token: str | None = None) -> requests.Session:
        """A plain HTTP session with a user's basic auth or a token."""
        session = requests.Session()
        if user:
            session.auth = (user, USERS[user][0])
        if token:
            session.headers["X-Auth-Token"] = token
        return session

    def trove(self, user: str | None = None, token: str | None = None, project: str | None = None):
        """python-troveclient as a tenant runs it without Keystone."""
        from keystoneauth1 import http_basic, session, token_endpoint
        from troveclient.v1 import client
        project = project or (USERS[user][1] if user else TOKENS[token][0])
        if user:
            auth = http_basic.HTTPBasicAuth(endpoint=self.endpoint(project), username=user,
                                            password=USERS[user][0])
        else:
            auth = token_endpoint.Token(self.endpoint(project), token)
        return client.Client(session=session.Session(auth=auth))

    def openstack(self, *args: str, user: str | None = None, token: str | None = None,
                  timeout: float = 120) -> subprocess.CompletedProcess:
        """``openstack …`` with the settings a tenant exports."""
        project = USERS[user][1] if user else TOKENS[token][0]
        env = {"PATH": os.environ["PATH"], "HOME": str(self.log_path.parent),
               "OS_ENDPOINT": self.endpoint(project)}
        if user:
            env.update(OS_AUTH_TYPE="http_basic", OS_USERNAME=user, OS_PASSWORD=USERS[user][0])
        else:
            env.update(OS_AUTH_TYPE="admin_token", OS_TOKEN=token)
        return subprocess.run([OPENSTACK, *args], env=env, capture_output=True, text=True, timeout=timeout)

    def openstack_json(self, *args: str, **auth):
        result = self.openstack(*args, "-f", "json", **auth)
        assert result.returncode == 0, f"openstack {' '.join(args)}: {result.stderr}\n{self.log()[-3000:]}"
        return json.loads(result.stdout)
