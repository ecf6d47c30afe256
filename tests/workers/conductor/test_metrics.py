"""The conductor's Prometheus metrics, scraped from a real worker: guests' traffic (applied,
stale, refused by reason), batch sizes, send-to-commit latency, sweeps and what they
changed, instances by status and queue depths."""

import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.guests import Publisher
from tests.support.services import ROOT, wait_until
from tests.support.stack import make_instances

CAST_SWEEP = """
from dbaas.celery import app
from workers.conductor.api import ConductorAPI
ConductorAPI(app).sweep()
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict:
    """(name, labels as a sorted tuple) -> value of every sample."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_conductor_exports_what_an_operator_needs(stack):
    instances = make_instances(5)
    port = free_port()
    conductor = stack.worker(DBAAS_METRICS_PORT=str(port), DBAAS_AGENT_HEARTBEAT_EXPIRY="1").start()
    publisher = Publisher(stack.broker_url)
    try:
        sent = time.time()
        (first, secret), *others = instances.items()
        for instance_id, guest_secret in instances.items():
            publisher.heartbeat(instance_id, guest_secret, sent, "running")
        publisher.heartbeat(first, secret, sent - 10, "crashed")     # older: stale
        publisher.heartbeat(first, "0" * 64, sent + 1)               # forged
        publisher.raw(b"{not json", content_type="application/json", content_encoding="utf-8",
                      headers={"task": "conductor.heartbeat", "id": "x",
                               "dbaas_auth": {"v": 1, "principal": "service", "mac": "0" * 64}})

        def counted():
            samples = scrape(port)
            return samples if value(samples, "dbaas_guest_messages_total",
                                    task="conductor.heartbeat", outcome="applied") == 5 and \
                value(samples, "dbaas_guest_messages_total", task="conductor.heartbeat", outcome="stale") == 1 \
                else None
        samples = wait_until(counted, timeout=60, message="heartbeats counted")
        assert value(samples, "dbaas_guest_messages_refused_total", reason="unauthenticated") == 1
        assert value(samples, "dbaas_guest_messages_refused_total", reason="malformed") == 1
        assert value(samples, "dbaas_guest_batch_messages_count") >= 1
        assert value(samples, "dbaas_guest_batch_messages_sum") == 6
        assert value(samples, "dbaas_heartbeat_send_to_commit_seconds_count") == 6
        time.sleep(5)  # instances by status are cached for 5 s
        samples = scrape(port)
        assert value(samples, "dbaas_instances", status="ACTIVE") == 5
        assert value(samples, "dbaas_queue_messages", queue="trove-conductor") == 0

        time.sleep(2)  # past the heartbeat expiry: the sweep turns all five ERROR
        subprocess.run([sys.executable, "-c", CAST_SWEEP], cwd=ROOT, env=stack.client_env(),
                       check=True, timeout=60)

        def swept():
            samples = scrape(port)
            return samples if value(samples, "dbaas_sweeps_total") == 1 else None
        time.sleep(5)  # the instance counts are cached for 5 s
        samples = wait_until(swept, timeout=60, message="the sweep counted")
        assert value(samples, "dbaas_sweep_changes_total", change="heartbeat_expiries") == 5
        assert value(samples, "dbaas_instances", status="ERROR") == 5
    finally:
        publisher.close()
        conductor.stop()
