"""Hostile input: schemathesis's command line against the live API's OpenAPI document, in
front of a real conductor and taskmanager. No answer may be a 5xx, and every 4xx must be
Trove's fault body (schemathesis_hooks.py); besides, statuses, content types and headers
must be the documented ones, and an operation that needs credentials must refuse a
request without them.

Bounded in time: a fixed number of examples per operation, a fixed seed, no stateful
phase (about 1,300 requests, 20 s here). Half of the ids it sends are of objects that
exist, so deletes, actions and backups reach the conductor's rules, not only a 404.

Not run: ``positive_data_acceptance`` and ``negative_data_rejection`` — the API checks more
than its schema says (the configured flavors, one action at a time, ids that exist) and
refuses with 400 on purpose.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dbaas import db
from dbaas.models import Backup, Instance
from tests.support.services import ROOT

pytestmark = [pytest.mark.fuzz, pytest.mark.parametrize("stack", ["rabbitmq-postgresql"], indirect=True)]

SCHEMATHESIS = str(Path(sys.executable).parent / "st")
MAX_EXAMPLES = 25
SEED = 1
CHECKS = ["not_a_server_error", "trove_fault_body", "ignored_auth", "status_code_conformance",
          "content_type_conformance", "response_headers_conformance", "allow_header_conformance",
          "missing_required_header", "unsupported_method"]


def existing_objects(api) -> tuple[list[str], list[str]]:
    """Two instances (one ACTIVE) and a COMPLETED backup of project alpha."""
    alice, url = api.session("alice"), api.endpoint("alpha")
    instances = [alice.post(f"{url}/instances", json={"instance": {"name": f"db{n}", "flavorRef": 1,
                                                                    "volume": {"size": 1}}}).json()["instance"]["id"]
                 for n in range(2)]

    def activate(session):
        instance = session.get(Instance, instances[0])
        instance.task_status, instance.service_status = "NONE", "running"
    db.run_transaction(activate)
    backup = alice.post(f"{url}/backups", json={"backup": {"name": "b", "instance": instances[0]}}).json()["backup"]["id"]

    def complete(session):
        row = session.get(Backup, backup)
        row.state, row.location, row.size = "COMPLETED", "file:///nowhere", 0.1
    db.run_transaction(complete)
    return instances, [backup]


def test_hostile_input_gets_no_server_error_and_only_trove_fault_bodies(running, api, tmp_path):
    running.ok("quota", "set", "alpha", "--instances", "5", "--backups", "5")
    instances, backups = existing_objects(api)
    config = tmp_path / "schemathesis.toml"
    config.write_text("\n".join([
        "[dictionaries.instances]", f"values = {json.dumps(instances)}",
        "[dictionaries.backups]", f"values = {json.dumps(backups)}",
        "[parameters]",
        '"path.project_id" = "alpha"',
        '"path.instance_id" = { dictionary = "instances", probability = 0.5 }',
        '"path.backup_id" = { dictionary = "backups", probability = 0.5 }',
        '"query.instance_id" = { dictionary = "instances", probability = 0.5 }',
        '"body.backup.instance" = { dictionary = "instances", probability = 0.5 }',
        '"body.instance.restorePoint.backupRef" = { dictionary = "backups", probability = 0.5 }',
    ]) + "\n")
    result = subprocess.run(
        [SCHEMATHESIS, "--config-file", str(config), "run", f"{api.url}/openapi.json",
         "--auth", "alice:alice-password", "--checks", ",".join(CHECKS),
         "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--generation-database", "none",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "20", "--no-color"],
        cwd=tmp_path, env={**running.client_env, "PYTHONPATH": str(ROOT),
                           "SCHEMATHESIS_HOOKS": "tests.workers.api.schemathesis_hooks"},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5_000:]
    assert "Tested: 26" in result.stdout and " passed" in result.stdout, result.stdout[-5_000:]
    assert "Traceback" not in api.log()
