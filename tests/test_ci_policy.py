"""With CI=true a missing PostgreSQL or RabbitMQ fails the run; elsewhere it skips."""

import subprocess
import sys

import pytest

from tests.support.services import ROOT, project_env

UNREACHABLE = {
    "PostgreSQL": ("DBAAS_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:1/postgres",
                   "tests/workers/conductor/test_sweeps.py::test_build_timeout_turns_error_once"),
    "RabbitMQ": ("DBAAS_TEST_AMQP_HOST", "127.0.0.1:1",
                 "tests/workers/conductor/test_conductor_processes.py::"
                 "test_database_outage_means_retries_not_loss"),
}


@pytest.mark.parametrize("service", sorted(UNREACHABLE))
@pytest.mark.parametrize("ci", ["true", ""])
def test_unreachable_service_fails_only_in_ci(service, ci):
    variable, value, test = UNREACHABLE[service]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", test],
                            env=project_env(**{variable: value, "CI": ci}), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert f"{service} unreachable" in result.stdout, result.stdout
    if ci:
        assert result.returncode == 1  # a failure, or an error in a fixture
    else:
        assert result.returncode == 0 and " skipped" in result.stdout
