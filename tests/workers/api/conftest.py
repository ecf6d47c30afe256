import glob
import os
import shutil
import tempfile

import pytest

from tests.support.api import ApiServer
from tests.support.stack import Running, configure


@pytest.fixture
def serve(tmp_path):
    """serve(system, **DBAAS_API_settings) -> the REST API process in front of a running
    system; stopped afterwards, when it must not have tried to load the database layer."""
    servers = []

    def start(system: Running, **settings) -> ApiServer:
        servers.append(ApiServer(system.client_env, tmp_path, **settings).start())
        return servers[-1]
    yield start
    for server in servers:
        server.stop()
    for server in servers:
        assert server.imports.read_text() == "", server.imports.read_text()


@pytest.fixture
def api(running, serve) -> ApiServer:
    """The API before a conductor and a taskmanager whose guests run and do nothing."""
    return serve(running)


@pytest.fixture
def reachable_var_dir(stack, monkeypatch):
    """A var dir the ``postgres`` OS user can reach, for PostgreSQL guests (pytest's
    tmp_path is private to root; initdb refuses root, so guests run it as ``postgres``)."""
    if not (os.geteuid() == 0 and glob.glob("/usr/lib/postgresql/*/bin/initdb")):
        pytest.skip("PostgreSQL guests need root and PostgreSQL server programs")
    path = tempfile.mkdtemp(prefix="dbaas-var-")
    os.chmod(path, 0o711)
    configure(monkeypatch, DBAAS_VAR_DIR=path)
    yield path
    shutil.rmtree(path)
