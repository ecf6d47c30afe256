#!/usr/bin/env python
"""Latency of the REST API through the conductor — ``GET …/instances/{id}`` and a list of
100 instances — beside guests' heartbeats, on real RabbitMQ + PostgreSQL with the
product's commands.

    . .venv/bin/activate
    python bench/api.py [--rate 50] [--seconds 20] [--heartbeat-rate 1000]

One run, with its own throw-away database and vhost, one conductor
(``celery -A dbaas worker -Q trove-conductor``) and one API (``python -m workers.api``),
a project of 100 instances and 1,000 more instances whose guests beat. Each measurement is
requests at ``--rate``/s on an absolute schedule (a slow answer does not thin out the load)
over one keep-alive connection with a token, timed in the client:

1. floor: ``ConductorAPI.instance_show`` from this process without HTTP (the call alone:
   what the API adds to it), then show and the 100-instance list through the API, nothing
   else on the broker;
2. flowing: the same while a publisher sends heartbeats at ``--heartbeat-rate``/s.

Prints p50/p90/p99/max per measurement, and for the flowing ones the ratio of their p50 and
p99 to the p50 of the same request's floor. Target (issue "The front door"): p99 of show under 50 ms
with heartbeats flowing.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.calls import heartbeats_at, percentile  # noqa: E402
from tests.support.guests import Publisher  # noqa: E402
from tests.support.services import PostgresDatabase, RabbitVhost, Worker, project_env  # noqa: E402

LISTED = 100
BEATING = 1000
PROJECT = "bench"
TOKEN = "bench-token-0123456789abcdef"


def summary(label: str, timings: list[float], floor_p50: float | None) -> str:
    ms = [t * 1000 for t in timings]
    p50, p90, p99 = percentile(ms, 50), percentile(ms, 90), percentile(ms, 99)
    ratio = f"  p50 {p50 / floor_p50:.2f}x floor, p99 {p99 / floor_p50:.2f}x floor" if floor_p50 else ""
    return (f"{label:<16} n={len(ms):<5} p50 {p50:6.1f} ms  p90 {p90:6.1f} ms  p99 {p99:6.1f} ms  "
            f"max {max(ms):6.1f} ms{ratio}")


def timed(request, rate: float, seconds: float) -> list[float]:
    """``request()`` at ``rate``/s on an absolute schedule; each one's duration."""
    timings, start = [], time.monotonic()
    for n in range(int(rate * seconds)):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        began = time.monotonic()
        request()
        timings.append(time.monotonic() - began)
    return timings


def start_api(env: dict, log: Path, port: int) -> subprocess.Popen:
    with open(log, "ab") as out:
        api = subprocess.Popen([sys.executable, "-m", "workers.api"], cwd=ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return api
        except requests.ConnectionError:
            time.sleep(0.2)
    api.kill()
    raise RuntimeError(f"the API did not start:\n{log.read_text()}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--heartbeat-rate", type=float, default=1000)
    parser.add_argument("--port", type=int, default=18779)
    opts = parser.parse_args()

    database, vhost = PostgresDatabase().create(), RabbitVhost().create()
    var_dir = Path(f"/tmp/dbaas-bench-api-{os.getpid()}")
    var_dir.mkdir(parents=True)
    from workers.api.credentials import token_digest
    # The heartbeats come from one publisher impersonating every guest over one broker
    # connection: RabbitMQ cannot vouch for each guest, so the conductor must not require it.
    env = project_env(DBAAS_VAR_DIR=str(var_dir), DBAAS_DATABASE_URL=database.url,
                      DBAAS_BROKER_URL=vhost.url, DBAAS_SERVICE_KEY="bench-service-key",
                      DBAAS_REQUIRE_GUEST_USER_ID="false", DBAAS_API_PORT=str(opts.port),
                      DBAAS_API_CREDENTIALS=json.dumps({"tokens": [
                          {"name": "bench", "sha256": token_digest(TOKEN), "project": PROJECT}]}))
    os.environ.update({k: v for k, v in env.items() if k.startswith("DBAAS_")})
    from dbaas import migrations  # settings are read on first use: after the environment is set
    from dbaas.celery import app
    from tests.support.stack import make_instances
    from workers.conductor.api import ConductorAPI

    conductor_worker = api = None
    publisher = Publisher(vhost.url)
    try:
        migrations.upgrade()
        listed = list(make_instances(LISTED, PROJECT, flavor_id="1", volume_size=1,
                                     task_status="NONE", service_status="running"))
        beating = make_instances(BEATING, "load")
        conductor_worker = Worker(env, var_dir / "conductor.log").start()
        api = start_api({k: v for k, v in env.items() if k != "DBAAS_DATABASE_URL"},
                        var_dir / "api.log", opts.port)

        session = requests.Session()
        session.headers["X-Auth-Token"] = TOKEN
        base = f"http://127.0.0.1:{opts.port}/v1.0/{PROJECT}/instances"
        shown = listed[0]

        def show():
            response = session.get(f"{base}/{shown}")
            assert response.status_code == 200, response.text

        def list_all():
            response = session.get(f"{base}?include_clustered=False")
            assert response.status_code == 200 and len(response.json()["instances"]) == LISTED, response.text[:300]

        conductor = ConductorAPI(app)
        conductor.instance_show(shown)
        show(), list_all()  # connections warm, reply queues declared
        results: dict[str, list[float]] = {}
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
        print(f"floor: {opts.rate:g} requests/s for {opts.seconds:g} s each, nothing else on the broker",
              flush=True)
        results["call floor"] = timed(lambda: conductor.instance_show(shown), opts.rate, opts.seconds)
        results["show floor"] = timed(show, opts.rate, opts.seconds)
        results["list floor"] = timed(list_all, opts.rate, opts.seconds)

        print(f"flowing: heartbeats at {opts.heartbeat_rate:g}/s to {BEATING} instances beside the requests",
              flush=True)
        stop, sent = threading.Event(), []
        beats = threading.Thread(target=lambda: sent.append(
            heartbeats_at(publisher, beating, opts.heartbeat_rate, stop)))
        began = time.monotonic()
        beats.start()
        time.sleep(2)  # the stream settles
        results["call flowing"] = timed(lambda: conductor.instance_show(shown), opts.rate, opts.seconds)
        results["show flowing"] = timed(show, opts.rate, opts.seconds)
        results["list flowing"] = timed(list_all, opts.rate, opts.seconds)
        stop.set()
        beats.join()
        elapsed = time.monotonic() - began
        print(f"  heartbeats sent: {sent[0]} in {elapsed:.0f} s ({sent[0] / elapsed:.0f}/s achieved); "
              f"queue after: {publisher.depth()}; load average after: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

        floors = {kind: percentile([t * 1000 for t in results[f"{kind} floor"]], 50)
                  for kind in ("call", "show", "list")}
        print()
        for label, timings in results.items():
            kind = label.split()[0]
            print(summary(label, timings, floors.get(kind) if label.endswith("flowing") else None))
        return 0
    finally:
        if api:
            api.terminate()
            api.wait(timeout=20)
        if conductor_worker:
            conductor_worker.stop()
        publisher.close()
        vhost.drop()
        database.drop()
        shutil.rmtree(var_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
