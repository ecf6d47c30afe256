#!/usr/bin/env python
"""Latency of a conductor call (``instance show``) beside guests' heartbeats, on real
RabbitMQ + PostgreSQL with the product's worker command.

    . .venv/bin/activate
    python bench/calls.py [--rate 20] [--seconds 20] [--heartbeat-rate 1000] [--backlog 20000]

One run, with its own throw-away database and vhost, one conductor
(``celery -A dbaas worker -Q trove-conductor``), three phases:

1. floor: calls alone, nothing else on the broker;
2. flowing: calls at ``--rate``/s while a publisher sends heartbeats at
   ``--heartbeat-rate``/s, each to one of 1,000 instances;
3. backlog: ``--backlog`` heartbeats queued before the conductor starts, then calls at
   ``--rate``/s for as long as heartbeats are still queued (the queue depth is read before
   each call).

Each call is timed in the caller (``ConductorAPI.instance_show``: publish with confirm,
the conductor's transaction, the answer on the rpc reply queue). Prints p50/p90/p99/max
per phase and the ratio of each to the floor's p50. Targets (issue "Phase 3"): p99 under
100 ms with heartbeats flowing, under 1 s with the backlog.
"""

import argparse
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.guests import Publisher  # noqa: E402
from tests.support.services import PostgresDatabase, RabbitVhost, Worker, project_env  # noqa: E402

INSTANCES = 1000


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def summary(label: str, timings: list[float], floor_p50: float | None) -> str:
    ms = [t * 1000 for t in timings]
    p50, p90, p99 = percentile(ms, 50), percentile(ms, 90), percentile(ms, 99)
    ratio = f"  p50 {p50 / floor_p50:.1f}x floor, p99 {p99 / floor_p50:.1f}x floor" if floor_p50 else ""
    return (f"{label:<9} n={len(ms):<4} p50 {p50:6.1f} ms  p90 {p90:6.1f} ms  p99 {p99:6.1f} ms  "
            f"max {max(ms):6.1f} ms{ratio}")


def timed_calls(conductor, instance_id: str, rate: float, seconds: float,
                while_true=None) -> list[float]:
    """Calls on an absolute schedule (a slow answer does not thin out the load); with
    ``while_true``, only as long as it holds before each call."""
    timings, start = [], time.monotonic()
    for n in range(int(rate * seconds)):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if while_true is not None and not while_true():
            break
        began = time.monotonic()
        conductor.instance_show(instance_id)
        timings.append(time.monotonic() - began)
    return timings


def heartbeats_at(publisher: Publisher, instances: dict, rate: float, stop: threading.Event) -> int:
    ids, sent, start = list(instances), 0, time.monotonic()
    while not stop.is_set():
        delay = start + sent / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        instance_id = ids[sent % len(ids)]
        publisher.heartbeat(instance_id, instances[instance_id], time.time())
        sent += 1
    return sent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--heartbeat-rate", type=float, default=1000)
    parser.add_argument("--backlog", type=int, default=20_000)
    opts = parser.parse_args()

    database, vhost = PostgresDatabase().create(), RabbitVhost().create()
    var_dir = Path(f"/tmp/dbaas-bench-calls-{os.getpid()}")
    # The heartbeats come from one publisher impersonating every guest over one broker
    # connection: RabbitMQ cannot vouch for each guest, so the conductor must not require it.
    env = project_env(DBAAS_VAR_DIR=str(var_dir), DBAAS_DATABASE_URL=database.url,
                      DBAAS_BROKER_URL=vhost.url, DBAAS_SERVICE_KEY="bench-service-key",
                      DBAAS_REQUIRE_GUEST_USER_ID="false")
    os.environ.update({k: v for k, v in env.items() if k.startswith("DBAAS_")})
    from dbaas import migrations  # settings are read on first use: after the environment is set
    from dbaas.celery import app
    from tests.support.stack import make_instances
    from workers.conductor.api import ConductorAPI

    conductor_worker = None
    publisher = Publisher(vhost.url)
    try:
        migrations.upgrade()
        instances = make_instances(INSTANCES)
        shown = next(iter(instances))
        conductor = ConductorAPI(app)
        results: dict[str, list[float]] = {}

        conductor_worker = Worker(env, var_dir / "conductor.log").start()
        conductor.instance_show(shown)  # reply queue declared, connections warm
        print(f"floor: {opts.rate:g} calls/s for {opts.seconds:g} s, nothing else on the broker", flush=True)
        results["floor"] = timed_calls(conductor, shown, opts.rate, opts.seconds)

        print(f"flowing: heartbeats at {opts.heartbeat_rate:g}/s beside the calls", flush=True)
        stop = threading.Event()
        sent = []
        beats = threading.Thread(target=lambda: sent.append(
            heartbeats_at(publisher, instances, opts.heartbeat_rate, stop)))
        beats.start()
        time.sleep(2)  # the stream settles
        results["flowing"] = timed_calls(conductor, shown, opts.rate, opts.seconds)
        stop.set()
        beats.join()
        elapsed = opts.seconds + 2
        print(f"  heartbeats sent: {sent[0]} ({sent[0] / elapsed:.0f}/s achieved); "
              f"queue after: {publisher.depth()}", flush=True)

        # Stop the conductor only once it has drained the stream: nothing consumes after.
        while publisher.depth():
            time.sleep(0.5)
        time.sleep(1)  # the last batch committed and acknowledged
        conductor_worker.stop()
        print(f"backlog: {opts.backlog} heartbeats queued, then the conductor starts", flush=True)
        base = time.time() - 10_000
        ids = list(instances)
        for n in range(opts.backlog):
            instance_id = ids[n % len(ids)]
            publisher.heartbeat(instance_id, instances[instance_id], base + n)
        while publisher.depth() < opts.backlog:
            time.sleep(0.1)
        conductor_worker = Worker(env, var_dir / "conductor2.log").start()
        # Only calls made while heartbeats are still queued count.
        results["backlog"] = timed_calls(conductor, shown, opts.rate, opts.seconds,
                                         while_true=lambda: publisher.depth() > 0)
        print(f"  backlog left when the calls ended: {publisher.depth()} of {opts.backlog}", flush=True)

        floor_p50 = percentile([t * 1000 for t in results["floor"]], 50)
        print()
        for label, timings in results.items():
            print(summary(label, timings, None if label == "floor" else floor_p50))
        return 0
    finally:
        if conductor_worker:
            conductor_worker.stop()
        publisher.close()
        vhost.drop()
        database.drop()


if __name__ == "__main__":
    sys.exit(main())
