"""``python -m workers.api`` refuses to start on settings or credentials it cannot use,
saying why in one line."""

import subprocess
import sys

import pytest

from tests.support.services import ROOT, project_env


@pytest.mark.parametrize("setting, message", [
    ({"DBAAS_API_CREDENTIALS": '{"users": 5}'}, 'error: "users" must be a list of objects'),
    ({"DBAAS_API_CREDENTIALS": "{"}, "error: not JSON"),
    ({"DBAAS_API_CREDENTIALS": '{"tokens": [{"name": "t", "sha256": "ab", "project": "p"}]}'},
     "error: token t: sha256 must be the token's hex SHA-256 digest"),
    ({"DBAAS_API_FLAVORS": "1:small"}, "error: DBAAS_API_FLAVORS: '1:small' is not ID:NAME:RAM_MB:VCPUS:DISK_GB"),
    ({"DBAAS_API_FLAVORS": "1:a:1:1:1,1:b:1:1:1"}, "error: DBAAS_API_FLAVORS: at least one flavor, each id once"),
    ({"DBAAS_API_PORT": "0"}, "error: DBAAS_API_PORT='0' is not a positive integer"),
])
def test_bad_settings_stop_the_start(tmp_path, setting, message):
    result = subprocess.run([sys.executable, "-m", "workers.api"], cwd=ROOT, capture_output=True, text=True,
                            env=project_env(DBAAS_VAR_DIR=str(tmp_path), **setting), timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(message), result.stderr
