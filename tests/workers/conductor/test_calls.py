"""Calls to the conductor never wait behind guests' traffic: with 20,000 heartbeats queued,
a call (``instance show``) still answers within a second — they travel on the control
queue, which every conductor consumes beside the guests' queue."""

import json
import subprocess
import sys
import time

from tests.support.guests import Publisher
from tests.support.services import ROOT, wait_until
from tests.support.stack import make_instances

BACKLOG = 20_000
CALLS = 10

TIMED_CALLS = f"""
import json, sys, time
from dbaas.celery import app
from workers.conductor.api import ConductorAPI
conductor = ConductorAPI(app)
timings = []
for _ in range({CALLS}):
    started = time.monotonic()
    view = conductor.instance_show(sys.argv[1])
    timings.append(time.monotonic() - started)
    assert view["id"] == sys.argv[1]
print(json.dumps(timings))
"""


def test_a_call_overtakes_a_backlog_of_heartbeats(stack):
    instances = make_instances(1000)
    publisher = Publisher(stack.broker_url)
    try:
        base = time.time() - 1000
        for n in range(BACKLOG // len(instances)):
            for instance_id, secret in instances.items():
                publisher.heartbeat(instance_id, secret, base + n)
        wait_until(lambda: publisher.depth() == BACKLOG, timeout=120, message="the backlog queued")
        conductor = stack.worker().start()
        try:
            wait_until(lambda: publisher.depth() < BACKLOG, timeout=60, message="the drain started")
            shown = next(iter(instances))
            started = time.monotonic()
            result = subprocess.run([sys.executable, "manage.py", "instance", "show", shown, "--json"],
                                    cwd=ROOT, env=stack.client_env(), capture_output=True, text=True,
                                    timeout=60)
            cli_seconds = time.monotonic() - started
            assert result.returncode == 0, result.stderr
            timings = json.loads(subprocess.run(
                [sys.executable, "-c", TIMED_CALLS, shown], cwd=ROOT, env=stack.client_env(),
                capture_output=True, text=True, timeout=120, check=True).stdout)
            left = publisher.depth()
            print(f"\n{stack.kind}: backlog left {left} of {BACKLOG}; `manage.py instance show` "
                  f"{cli_seconds:.2f}s end to end; calls {', '.join(f'{t * 1000:.0f}' for t in timings)} ms")
            assert left > BACKLOG // 4, "the backlog drained before the calls: nothing was measured"
            assert max(timings) < 1.0
        finally:
            conductor.stop()
    finally:
        publisher.close()
