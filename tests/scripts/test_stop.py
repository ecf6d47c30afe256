"""scripts/stop: stops the run of this checkout as Ctrl-C does — warmly, a call in flight
answered, nothing left — and says so when none runs."""

import subprocess

import pytest

from tests.support.run import run_env, stop_with_a_call_in_flight
from tests.support.services import ROOT

pytestmark = pytest.mark.timeout(400)


def test_scripts_stop_stops_every_process_warmly(tmp_path):
    def scripts_stop(terminal, env):
        return subprocess.Popen([str(ROOT / "scripts" / "stop")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    seen = stop_with_a_call_in_flight(tmp_path, scripts_stop)
    out, _ = seen["stopped"].communicate(timeout=60)
    assert seen["stopped"].returncode == 0, out
    assert "stopping the system of" in out and "stopped in" in out
    # Its output still went through `| tee`: the whole stop is in the log.
    log = seen["log"]
    for name in ("conductor", "taskmanager", "beat", "flower"):
        assert f"{name}.1 stopped (rc=0)" in log, log[-4000:]
    assert log.count("Warm shutdown") == 2 and "SIGKILL" not in log, log[-4000:]


def test_scripts_stop_without_a_run_says_so(tmp_path):
    result = subprocess.run([str(ROOT / "scripts" / "stop")], cwd=ROOT, env=run_env(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"the system of {tmp_path / 'var'} is not running"
