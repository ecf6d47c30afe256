"""The guest agent's command line (``python -m workers.guestagent``) as a real process."""

import os
import subprocess
import sys

import pytest

from tests.support.services import ROOT, project_env


@pytest.mark.parametrize("content", [None, "{not json", '{"instance_id": "x"}', "[1, 2]"],
                         ids=["missing", "not-json", "missing-keys", "not-a-mapping"])
def test_a_bad_config_fails_cleanly(tmp_path, content):
    path = tmp_path / "guest.json"
    if content is not None:
        path.write_text(content)
        os.chmod(path, 0o600)
    result = subprocess.run([sys.executable, "-m", "workers.guestagent", "heartbeat", "--config",
                             str(path), "--status", "running"], cwd=ROOT,
                            env=project_env(DBAAS_VAR_DIR=str(tmp_path / "var")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    [message] = result.stderr.strip().splitlines()
    assert message.startswith(f"cannot read guest config {path}: ")
