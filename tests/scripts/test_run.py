"""scripts/run as an operator runs it: stopped by Ctrl-C and by a closed terminal while its
output goes through `| tee`, with a call in flight in the conductor; refused in one line
while a run of the checkout is up or a port of the Procfile is taken."""

import socket
import subprocess

import pytest

from dbaas.system import ENDPOINTS, procfile
from tests.support.run import BackgroundRun, end_everything, processes_of, run_env, stop_with_a_call_in_flight
from tests.support.services import ROOT

pytestmark = pytest.mark.timeout(400)


def test_ctrl_c_stops_every_process_warmly_also_through_a_pipe(tmp_path):
    def ctrl_c(terminal, env):
        terminal.ctrl_c()
    seen = stop_with_a_call_in_flight(tmp_path, ctrl_c)
    assert seen["terminal"].rstrip().endswith("$"), "the prompt is back"


def test_closing_the_terminal_stops_every_process_warmly(tmp_path):
    def hang_up(terminal, env):
        terminal.hang_up()
    stop_with_a_call_in_flight(tmp_path, hang_up)


def assert_refused_in_one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0, output
    assert len(output.splitlines()) == 1, output
    assert "Traceback" not in output and "Flower: http" not in output
    for word in words:
        assert word in output, output
    return output


def test_a_second_run_of_the_checkout_is_refused_in_one_line(tmp_path):
    env = run_env(tmp_path)
    first = BackgroundRun(env, tmp_path / "first.log")
    try:
        first.wait_up()
        before = processes_of(env["DBAAS_VAR_DIR"])
        second = subprocess.run([str(ROOT / "scripts" / "run")], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        assert_refused_in_one_line(second, "already running", "scripts/stop")
        assert first.process.poll() is None
        # Nothing of the second run is left, and nothing of the first was stopped.
        assert set(processes_of(env["DBAAS_VAR_DIR"])) >= set(before)
        assert not set(processes_of(env["DBAAS_VAR_DIR"])) - set(before)
    finally:
        first.end()


@pytest.mark.parametrize("name", sorted(set(procfile()) & set(ENDPOINTS)))
def test_a_taken_port_is_refused_in_one_line(tmp_path, name):
    env = run_env(tmp_path)
    port = int(env["FLOWER_PORT" if name == "flower" else "DBAAS_API_PORT"])
    try:
        with socket.create_server(("127.0.0.1", port)):
            result = subprocess.run([str(ROOT / "scripts" / "run")], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=120)
        assert_refused_in_one_line(result, name, str(port))
        assert not processes_of(env["DBAAS_VAR_DIR"])
    finally:
        end_everything(env["DBAAS_VAR_DIR"])
