#!/usr/bin/env python
"""Conductor heartbeat benchmark on real RabbitMQ + PostgreSQL with the product's worker
command (``celery -A dbaas worker -Q trove-conductor``). Issue 12's figures, and issue 6's
refusal line, in one run:

    . .venv/bin/activate
    python bench/heartbeats.py                        # defaults: about 5 minutes
    python bench/heartbeats.py --only drain --rounds 4

Phases (``--only`` picks some; bench/README.md says exactly what each measures):

1. drain: N pre-published heartbeats for M instances drained by one conductor, against
   the raw broker floor (a kombu consumer that only acknowledges, same prefetch: 3 x
   DBAAS_HEARTBEAT_BATCH_SIZE) in ABBA rounds; ratio; correctness check; per-heartbeat
   CPU of the conductor, RabbitMQ and PostgreSQL; what that means for a fleet.
2. scale: the same drain with 1, 2 and 3 conductor processes on the queue; CPU split.
3. latency: send->commit at steady rates (default 1,000/s for 15 s, 3,000/s for 30 s),
   queue depth sampled.
4. refusals: per kind of hostile message, N pre-published, refusals per second.
5. flood: 20,000 hostile messages of mixed kinds queued, valid heartbeats sent meanwhile.

Creates its own PostgreSQL database and RabbitMQ vhost and drops them at the end.
"""

import argparse
import json
import math
import os
import random
import secrets as pysecrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hb import hostile  # noqa: E402
from bench.hb.cpu import (CATEGORIES, CPUS, RABBIT_COMMS, Accounting, listener_pid,  # noqa: E402
                          pg_roles_query, split_text, threads_text)
from bench.hb.processes import QUEUE, Conductor, Profiler, log_problems, summarize_profile  # noqa: E402

PG_ADMIN_URL = os.environ.get("DBAAS_TEST_PG_ADMIN_URL",
                              "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
AMQP_HOST = os.environ.get("DBAAS_TEST_AMQP_HOST", "127.0.0.1:5672")
# Non-sticky statuses (a sticky one would, by design, not be overwritten by newer ones).
STATUSES = ["running", "healthy", "shutdown", "crashed", "paused", "blocked"]
PHASES = ("drain", "scale", "latency", "refusals", "flood")
PASSTHROUGH = ("DBAAS_HEARTBEAT_BATCH_SIZE", "DBAAS_HEARTBEAT_BATCH_INTERVAL")
PROBES = 8
BASIC_PUBLISH = struct.pack(">HH", 60, 40)  # AMQP class and method ids


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(p * len(sorted_values) / 100)))
    return sorted_values[rank - 1]


def stats(values: list) -> dict:
    values = sorted(values)
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": values[-1] if values else float("nan")}


def median(values: list) -> float:
    values = sorted(v for v in values if v == v)
    n = len(values)
    if not n:
        return float("nan")
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else 0.0


def product_tree() -> str:
    """Which product code the conductors run: ROOT's commit, and any uncommitted change to
    it (a shared working tree can hold someone's work in progress)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return f"{ROOT} (not a git checkout)"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "dbaas", "workers",
                                "celeryconfig.py"], capture_output=True, text=True, timeout=10).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{ROOT} ({exc})"
    if not dirty:
        return f"{ROOT} at commit {head.stdout.strip()}, no uncommitted change to dbaas/, workers/, celeryconfig.py"
    return (f"{ROOT} at commit {head.stdout.strip()} WITH UNCOMMITTED CHANGES to {len(dirty)} product files: "
            + ", ".join(dirty[:8]) + (" ..." if len(dirty) > 8 else ""))


class Bench:
    def __init__(self, opts):
        self.opts = opts
        self.results: dict = {"options": {k: v for k, v in vars(opts).items()}}
        self.work_dir = Path(tempfile.mkdtemp(prefix="dbaas-bench-"))
        self.service_key = pysecrets.token_hex(32)
        self.database = self.vhost = None
        self.poll_conn = None
        self.conductors: list[Conductor] = []
        self.helpers: list = []
        self.failed = False
        self.passthrough = {k: os.environ[k] for k in PASSTHROUGH if os.environ.get(k)}
        if opts.batch_size:
            self.passthrough["DBAAS_HEARTBEAT_BATCH_SIZE"] = str(opts.batch_size)
        if opts.batch_interval:
            self.passthrough["DBAAS_HEARTBEAT_BATCH_INTERVAL"] = str(opts.batch_interval)
        self.serial = 0

    # ------------------------------------------------------------------ environment

    def child_env(self, **extra) -> dict:
        """A conductor's environment: ``env_for`` of tests/conftest.py (database, broker,
        var dir, service key), the batch settings passed through, and, like the tests'
        ``Stack.worker``, DBAAS_REQUIRE_GUEST_USER_ID=false: this bench impersonates
        every guest over one broker connection, so RabbitMQ cannot vouch for each one."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DBAAS_")}
        env.update(self.passthrough)
        env["PYTHONPATH"] = str(ROOT)
        env.update(DBAAS_VAR_DIR=str(self.work_dir / "var"), DBAAS_DATABASE_URL=self.database.url,
                   DBAAS_BROKER_URL=self.vhost.url, DBAAS_SERVICE_KEY=self.service_key,
                   DBAAS_REQUIRE_GUEST_USER_ID="false")
        env.update(extra)
        return env

    def setup(self) -> None:
        from tests.support.services import PostgresDatabase, RabbitVhost

        database = PostgresDatabase()
        database.name = f"dbaas_bench_{uuid.uuid4().hex[:12]}"
        database.url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database.name
        self.database = database.create()
        vhost = RabbitVhost()
        vhost.name = database.name
        vhost.url = f"amqp://guest:guest@{AMQP_HOST}/{vhost.name}"
        self.vhost = vhost.create()
        log(f"database and vhost {database.name}; logs in {self.work_dir}")
        # This process plays the operator and the guests: settings from the environment.
        for key in [k for k in os.environ if k.startswith("DBAAS_")]:
            del os.environ[key]
        os.environ.update({k: v for k, v in self.child_env().items() if k.startswith("DBAAS_")})
        from dbaas import migrations, settings
        from workers.conductor import consumer
        self.config = settings.get()
        assert self.config.database_url == database.url and self.config.broker_url == vhost.url
        self.prefetch = consumer.prefetch_count(self.config)
        log(f"conductor settings: DBAAS_HEARTBEAT_BATCH_SIZE={self.config.heartbeat_batch_size}, "
            f"DBAAS_HEARTBEAT_BATCH_INTERVAL={self.config.heartbeat_batch_interval}; "
            f"guests' consumer prefetch {self.prefetch}")
        migrations.upgrade()
        import psycopg2
        from kombu import Connection
        from sqlalchemy.engine import make_url

        from tests.support.guests import Publisher
        url = make_url(database.url)
        self.dsn = dict(host=url.host, port=url.port or 5432, user=url.username,
                        password=url.password or "", dbname=url.database)
        self.poll_conn = psycopg2.connect(**self.dsn)
        self.poll_conn.autocommit = True
        self.roles_cursor = self.poll_conn.cursor()
        self.publisher = Publisher(vhost.url, QUEUE)
        self.rabbit_pid = listener_pid(int(AMQP_HOST.rsplit(":", 1)[1]), RABBIT_COMMS)
        self.postmaster_pid = listener_pid(self.dsn["port"], ("postgres",))
        log(f"RabbitMQ node pid {self.rabbit_pid}, PostgreSQL postmaster pid {self.postmaster_pid} "
            f"(their process trees are 'RabbitMQ' and 'PostgreSQL'; any other node or cluster is 'other')")
        self.monitor = Connection(vhost.url)
        self.monitor_channel = self.monitor.channel()

    def bench_backends(self) -> set[int]:
        """PostgreSQL backends that are this bench's own (poller, instance creation)."""
        return {pid for (pid,) in self.sql("SELECT pg_backend_pid()")}

    def accounting(self, conductors: list[Conductor], extra_pids=(), threads=None) -> Accounting:
        own = self.bench_backends()
        return Accounting([c.pid for c in conductors], [os.getpid(), *extra_pids],
                          lambda: pg_roles_query(self.roles_cursor, self.database.name, own), threads,
                          self.rabbit_pid, self.postmaster_pid)

    def teardown(self) -> None:
        for helper in self.helpers:
            try:
                helper.stop()
            except Exception as exc:
                log(f"stopping helper: {exc}")
        self.stop_conductors(list(self.conductors))
        for closer in (getattr(self, "publisher", None), getattr(self, "monitor", None)):
            try:
                if closer is not None:
                    (closer.close if hasattr(closer, "close") else closer.release)()
            except Exception:
                pass
        if self.poll_conn is not None:
            self.poll_conn.close()
        try:
            from dbaas import db
            if db._engine is not None:
                db._engine.dispose()
        except Exception:
            pass
        if not self.opts.keep:
            for what, thing in (("database", self.database), ("vhost", self.vhost)):
                if thing is not None:
                    try:
                        thing.drop()
                    except Exception as exc:
                        log(f"dropping {what} {thing.name}: {exc}")
        if self.failed or self.opts.keep:
            log(f"conductor logs kept in {self.work_dir}")
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def sql(self, statement: str, params=None) -> list:
        with self.poll_conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def depth(self) -> tuple[int, int]:
        """(messages ready, consumers) of the guests' queue."""
        _name, ready, consumers = self.monitor_channel.queue_declare(QUEUE, passive=True)
        return ready, consumers

    # ------------------------------------------------------------------ instances

    def create_instances(self) -> None:
        from dbaas import signing
        from tests.support.stack import make_instances

        opts = self.opts
        fleet = opts.fleet or int(max(rate for rate, _ in opts.rates) * opts.heartbeat_interval
                               if "latency" in opts.only and opts.rates else 0)
        started = time.perf_counter()
        groups = {}
        for name, count in (("drain", opts.instances), ("probes", PROBES), ("deleted", opts.deleted),
                            ("fleet", fleet)):
            group: dict[str, str] = {}
            while len(group) < count:
                group.update(make_instances(min(5000, count - len(group))))
            groups[name] = group
        self.drain, self.probes, self.deleted, self.fleet = (groups[k] for k in ("drain", "probes", "deleted", "fleet"))
        made = {k: v for group in groups.values() for k, v in group.items()}
        self.sql("UPDATE instances SET deleted = true, deleted_at = now() WHERE id = ANY(%s)",
                 (list(self.deleted),))
        assert all(made[i] == signing.guest_secret(self.service_key, i, 1) for i in list(made)[:3])
        self.drain_ids = list(self.drain)
        self.sql("VACUUM (ANALYZE) instances")
        from dbaas import db
        db.engine().dispose()   # its idle connections would be counted as the conductors'
        log(f"created {len(made)} instances in {time.perf_counter() - started:.1f}s: "
            f"{len(self.drain)} for the drains, {len(self.fleet)} for the latency phase "
            f"({opts.heartbeat_interval:g} s heartbeat interval at the highest rate), "
            f"{PROBES} probes, {len(self.deleted)} deleted")

    # ------------------------------------------------------------------ conductors

    def start_conductors(self, count: int, label: str, probe: bool = True, **env) -> list[Conductor]:
        """Start ``count`` conductors; return once each one's consumer is on the queue and
        each has applied a probe heartbeat (its loop runs; its start-up is over)."""
        started = []
        for k in range(count):
            self.serial += 1
            name = f"{label}-{k + 1}-{self.serial}"
            conductor = Conductor(self.child_env(**env), self.work_dir / f"{name}.log", name).start()
            self.conductors.append(conductor)
            started.append(conductor)
        t0 = time.perf_counter()
        deadline = time.monotonic() + 120
        while self.depth()[1] < count:
            for conductor in started:
                conductor.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} consumers not on the queue within 120 s:\n"
                                   + started[0].log_tail())
            time.sleep(0.02)
        consuming = time.perf_counter() - t0
        if probe:
            self.probe(started)
        for conductor in started:
            conductor.startup = {"consumer_s": consuming, "ready_s": time.perf_counter() - t0}
        time.sleep(0.5)
        return started

    def probe(self, conductors: list[Conductor], timeout: float = 60) -> None:
        """One valid heartbeat per probe instance; wait until all are applied."""
        sent = time.time()
        for instance_id, secret in self.probes.items():
            self.publisher.heartbeat(instance_id, secret, sent, "running")
        deadline = time.monotonic() + timeout
        while True:
            [(applied,)] = self.sql("SELECT count(*) FROM watermarks WHERE kind = 'heartbeat' "
                                    "AND key = ANY(%s) AND sent >= %s", (list(self.probes), sent - 1e-6))
            if applied == len(self.probes):
                return
            for conductor in conductors:
                conductor.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("probe heartbeats not applied:\n" + conductors[0].log_tail())
            time.sleep(0.02)

    def stop_conductors(self, conductors: list[Conductor]) -> None:
        for conductor in conductors:
            conductor.signal_group(signal.SIGCONT)
        for conductor in conductors:
            try:
                conductor.stop()
            except Exception as exc:
                log(f"stopping conductor {conductor.name}: {exc}")
            if conductor in self.conductors:
                self.conductors.remove(conductor)

    # ------------------------------------------------------------------ publishing

    def publish_all(self, messages: list[dict], held: int, consumers: list[Conductor] = ()) -> dict:
        """Publish ``messages`` (kombu publish kwargs) as fast as one producer can, then
        wait until the broker holds them all: ``ready`` reaches len - what the (frozen)
        consumers' prefetch took, and stays there. Returns the rate and RabbitMQ's and
        the publisher's CPU per message."""
        acct = self.accounting(consumers)
        started = time.perf_counter()
        publish = self.publisher.producer.publish
        for message in messages:
            publish(**message)
        n = len(messages)
        floor = max(0, n - held)
        deadline, last, stable = time.monotonic() + 120, None, 0
        while True:
            ready, _ = self.depth()
            stable = stable + 1 if ready == last and floor <= ready <= n else 0
            last = ready
            if stable >= 3 and (ready == floor or stable >= 20):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready} of {n} messages in the queue after 120 s")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu = acct.delta()
        return {"rate": n / elapsed, "seconds": elapsed,
                "rabbitmq_us_per_msg": cpu["cpu_s"]["rabbitmq"] / n * 1e6,
                "publisher_us_per_msg": cpu["cpu_s"]["bench"] / n * 1e6, "cpu": cpu}

    # ------------------------------------------------------------------ drains

    def reset_heartbeat_state(self) -> None:
        self.sql("DELETE FROM watermarks WHERE kind = 'heartbeat' AND key = ANY(%s)", (self.drain_ids,))
        self.sql("UPDATE instances SET service_status = NULL, service_status_updated = NULL, "
                 "last_heartbeat = NULL, guest_agent_version = NULL WHERE id = ANY(%s)", (self.drain_ids,))
        self.sql("VACUUM (ANALYZE) instances, watermarks")

    def drain_messages(self) -> tuple[list[dict], dict, float]:
        """N heartbeats for the M drain instances, shuffled: strictly increasing ``sent``
        per instance; each instance's newest message carries a status none of its older
        ones carries, so an older message applied after the newest one shows."""
        from workers.guestagent.client import build_message

        from dbaas import wire
        n, ids = self.opts.messages, self.drain_ids
        final = time.time() - 1.0
        per_instance = Counter(ids[k % len(ids)] for k in range(n))
        plan, newest = [], {}
        for instance_id, count in per_instance.items():
            last = random.choice(STATUSES)
            others = [s for s in STATUSES if s != last]
            for k in range(count):
                status = last if k == count - 1 else random.choice(others)
                plan.append((instance_id, final - (count - 1 - k) * 1e-3, status))
            newest[instance_id] = last
        random.shuffle(plan)
        messages = [build_message(i, self.drain[i], 1, wire.HEARTBEAT_TASK,
                                  [i, {"service_status": s, "guest_agent_version": "1.0"}, sent])
                    for i, sent, s in plan]
        return messages, newest, final

    def raw_floor(self, label: str) -> dict:
        """A plain kombu consumer in this process that only acknowledges (one basic.ack per
        message), prefetch = the conductor's guests' consumer's, on the same queue and
        the same kind of messages as the conductor's drain."""
        from kombu import Connection, Consumer

        from dbaas.queues import queue
        messages, _newest, _final = self.drain_messages()
        n = len(messages)
        pub = self.publish_all(messages, held=0)
        got = [0]
        marks = {}
        with Connection(self.vhost.url) as conn:
            channel = conn.channel()

            def on_message(message):
                message.ack()
                got[0] += 1
                if got[0] == n // 10 or got[0] == n - n // 10:
                    marks[got[0]] = time.perf_counter()

            consumer = Consumer(channel, queues=[queue(QUEUE)], on_message=on_message,
                                prefetch_count=self.prefetch, no_ack=False)
            acct = self.accounting([], threads={"raw consumer": os.getpid()})
            started = time.perf_counter()
            deadline = time.monotonic() + max(120.0, n / 100)
            with consumer:
                while got[0] < n:
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"raw consumer got {got[0]}/{n}")
            elapsed = time.perf_counter() - started
            cpu = acct.delta()
            channel.close()
        steady = (n - 2 * (n // 10)) / (marks[n - n // 10] - marks[n // 10]) if len(marks) == 2 else float("nan")
        runq = runqueue_share(cpu, "raw consumer")
        result = {"label": label, "prefetch": self.prefetch, "messages": n, "rate": n / elapsed,
                  "steady_rate": steady, "seconds": elapsed, "publish": pub, "cpu": cpu,
                  "runqueue_share": runq, "corrected_rate": n / (elapsed * (1 - runq)),
                  "consumer_us_per_msg": cpu["cpu_s"]["bench"] / n * 1e6,
                  "rabbitmq_us_per_msg": cpu["cpu_s"]["rabbitmq"] / n * 1e6}
        log(f"{label}: raw floor {result['rate']:.0f} msg/s (steady {steady:.0f}/s; prefetch "
            f"{self.prefetch}, one ack per message; consumer {result['consumer_us_per_msg']:.0f} us/msg, "
            f"RabbitMQ {result['rabbitmq_us_per_msg']:.0f} us/msg); {split_text(cpu)}; {threads_text(cpu)}")
        return result

    def conductor_drain(self, count: int, label: str) -> dict:
        """``count`` conductors started and idle, frozen (SIGSTOP to their own process
        groups) while the backlog is published, thawed together: the drain is timed from
        the thaw until every drain instance's watermark is at its newest ``sent`` and the
        queue holds nothing ready."""
        opts = self.opts
        self.reset_heartbeat_state()
        messages, newest, final = self.drain_messages()
        n = len(messages)
        conductors = self.start_conductors(count, label)
        profiler = None
        try:
            for conductor in conductors:
                conductor.freeze()
            pub = self.publish_all(messages, held=count * self.prefetch, consumers=conductors)
            commits_before = self.commits()
            if opts.profile:
                profiler = Profiler(conductors[0].pid, Path(opts.profile) / f"{label}.txt")
                self.helpers.append(profiler)
            acct = self.accounting(conductors)
            started = time.perf_counter()
            for conductor in conductors:
                conductor.thaw()
            marks, polls, db_polls = {}, 0, 0
            deadline = time.monotonic() + max(180.0, n / 50)
            high, low = int(n * 0.9), int(n * 0.1)
            while True:
                now = time.perf_counter()
                ready, _ = self.depth()
                polls += 1
                if ready <= high and "high" not in marks:
                    marks["high"] = (now, ready)
                if ready <= low and "low" not in marks:
                    marks["low"] = (now, ready)
                if ready == 0:
                    marks.setdefault("empty", now)
                    db_polls += 1
                    [(applied,)] = self.sql(
                        "SELECT count(*) FROM watermarks WHERE kind = 'heartbeat' AND sent "
                        "BETWEEN %s AND %s", (final - 5e-4, final + 5e-4))
                    if applied >= len(newest):
                        break
                for conductor in conductors:
                    conductor.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: not drained in time:\n{conductors[0].log_tail()}")
                time.sleep(0.005)
            elapsed = time.perf_counter() - started
            cpu = acct.delta()
            if profiler:
                profiler.stop()
                self.helpers.remove(profiler)
            time.sleep(0.3)   # the last multiple-ack; stale stragglers
            memory = [c.memory() for c in conductors]
        finally:
            if profiler and profiler in self.helpers:
                profiler.stop()
                self.helpers.remove(profiler)
            self.stop_conductors(conductors)
        left, _ = self.depth()
        commits = self.commits() - commits_before - db_polls - 2
        check = self.verify_drain(newest, final)
        problems = [p for c in conductors for p in log_problems(c.log_text())]
        (hi_t, hi_r), (lo_t, lo_r) = marks.get("high", (started, n)), marks.get("low", (started, 0))
        steady = (hi_r - lo_r) / (lo_t - hi_t) if lo_t > hi_t else float("nan")
        runq = runqueue_share(cpu, "conductor")
        result = {
            "label": label, "conductors": count, "messages": n, "rate": n / elapsed,
            "steady_rate": steady, "seconds": elapsed, "runqueue_share": runq,
            "corrected_rate": n / (elapsed * (1 - runq)),
            "tail_seconds": elapsed - (marks.get("empty", started + elapsed) - started),
            "publish": pub, "cpu": cpu, "memory": memory,
            "startup_s": [c.startup for c in conductors],
            "conductor_us_per_msg": cpu["cpu_s"]["conductors"] / n * 1e6,
            "conductor_main_us_per_msg": sum(cpu["conductor_main"]) * cpu["wall"] / n * 1e6,
            "rabbitmq_us_per_msg": cpu["cpu_s"]["rabbitmq"] / n * 1e6,
            "postgres_us_per_msg": cpu["cpu_s"]["postgres"] / n * 1e6,
            "approx_commits": commits, "msgs_per_commit": n / commits if commits > 0 else float("nan"),
            "left_in_queue": left, "mismatches": check, "log_problems": problems,
            "ok": not check and left == 0 and not problems,
        }
        if profiler:
            result["profile"] = str(profiler.out)
        log(f"{label}: {count} conductor(s) {result['rate']:.0f} msg/s (steady {steady:.0f}/s, "
            f"{elapsed:.2f}s, tail {result['tail_seconds']:.2f}s); conductors "
            f"{result['conductor_us_per_msg']:.0f} us/msg (main process "
            f"{result['conductor_main_us_per_msg']:.0f}), RabbitMQ {result['rabbitmq_us_per_msg']:.0f}, "
            f"PostgreSQL {result['postgres_us_per_msg']:.0f} us/msg; ~{result['msgs_per_commit']:.0f} "
            f"msgs/commit; {split_text(cpu)}; {threads_text(cpu)}; left {left}; "
            f"{'OK' if result['ok'] else 'FAILED ' + str(check) + ' ' + str(problems)}")
        return result

    def commits(self) -> int:
        """Transactions committed in the bench database so far (pg_stat_database; the
        conductors' counts are flushed at the latest when they disconnect)."""
        self.sql("SELECT pg_stat_force_next_flush()")
        time.sleep(0.2)
        [(value,)] = self.sql("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                              (self.database.name,))
        return int(value)

    def verify_drain(self, newest: dict, final: float) -> dict:
        rows = self.sql(
            "SELECT i.id, w.sent, i.service_status, i.last_heartbeat FROM instances i LEFT JOIN "
            "watermarks w ON w.kind = 'heartbeat' AND w.key = i.id WHERE i.id = ANY(%s)", (list(newest),))
        wrong = Counter()
        for instance_id, sent, status, last_heartbeat in rows:
            if sent is None or abs(sent - final) > 1e-6:
                wrong["watermark not at the newest sent"] += 1
            if status != newest[instance_id]:
                wrong["service_status not the newest message's"] += 1
            if last_heartbeat is None:
                wrong["no last_heartbeat"] += 1
        if len(rows) != len(newest):
            wrong["instances missing"] += len(newest) - len(rows)
        return dict(wrong)

    # ------------------------------------------------------------------ latency

    def install_commit_triggers(self) -> None:
        """In the bench database only: every statement that writes watermarks logs the
        rows it changed with its transaction id (bench_applied) and sends NOTIFY with it."""
        self.sql("CREATE UNLOGGED TABLE IF NOT EXISTS bench_applied (key text, sent double precision, xid bigint)")
        self.sql("""
            CREATE OR REPLACE FUNCTION bench_log_applied() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO bench_applied SELECT key, sent, txid_current() FROM new_rows;
                PERFORM pg_notify('bench_commit', txid_current()::text);
                RETURN NULL;
            END $$""")
        for event in ("INSERT", "UPDATE"):
            self.sql(f"CREATE OR REPLACE TRIGGER bench_applied_{event.lower()} AFTER {event} ON watermarks "
                     f"REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bench_log_applied()")

    def start_listener(self, conductors: list[Conductor], name: str):
        out = self.work_dir / f"listener-{name}.txt"
        config = {"dsn": self.dsn, "database": self.database.name, "out": str(out),
                  "conductor_pids": [c.pid for c in conductors], "bench_pids": [os.getpid()],
                  "bench_backends": sorted(self.bench_backends()), "broker_url": self.vhost.url,
                  "queue": QUEUE, "rabbit_pid": self.rabbit_pid, "postmaster_pid": self.postmaster_pid}
        process = subprocess.Popen([sys.executable, "-m", "bench.hb.listener", json.dumps(config)],
                                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                   stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        ready, _, _ = select.select([process.stdout], [], [], 30)
        if not ready or not process.stdout.readline().startswith(b"listening"):
            raise RuntimeError("commit listener did not start")
        listener = _Helper(process, out)
        self.helpers.append(listener)
        return listener

    def paced(self, targets, rate: float, until) -> dict:
        """Heartbeats on the absolute schedule start + i/rate, each built, signed
        (``sent`` = time.time() then) and published at its send time, to ``targets`` in
        turn, until ``until()`` holds (checked every 20 ms). Returns what was sent and how
        late. (The flood's valid heartbeats: a low rate, for as long as the flood lasts.)"""
        from workers.guestagent.client import build_message

        from dbaas import wire
        publish = self.publisher.producer.publish
        sent_list, lags = [], []
        start = time.monotonic() + 0.02
        next_check = start
        i = 0
        while True:
            target = start + i / rate
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.02
                if until():
                    break
            if target > now:
                time.sleep(min(target - now, 0.02))
                continue
            instance_id, secret = targets(i)
            sent = time.time()
            publish(**build_message(instance_id, secret, 1, wire.HEARTBEAT_TASK,
                                    [instance_id, {"service_status": "running", "guest_agent_version": "1.0"}, sent]))
            sent_list.append((instance_id, sent))
            lags.append(now - target)
            i += 1
        return {"sent": sent_list, "lags": sorted(lags)}

    def wire_frames(self, messages) -> list[bytes]:
        """The bytes the publisher's producer writes to the socket for each message (kombu
        publish kwargs): each published into a buffer instead of the socket."""
        from amqp.method_framing import frame_writer
        connection = self.publisher.connection.connection
        written: list[bytes] = []

        class Buffer:
            def write(self, data):
                written.append(bytes(data))

        socket_writer = connection.frame_writer
        connection.frame_writer = frame_writer(connection, Buffer())
        try:
            frames = []
            for message in messages:
                self.publisher.producer.publish(**message)
                frames.append(b"".join(written))
                written.clear()
        finally:
            connection.frame_writer = socket_writer
        # Each: one basic.publish method frame, its content header, its body frames.
        for data in frames:
            kinds, offset = [], 0
            while offset < len(data):
                kind, _channel, size = struct.unpack_from(">BHI", data, offset)
                kinds.append(kind)
                offset += 8 + size
            assert kinds[:2] == [1, 2] and set(kinds[2:]) <= {3} and data[7:11] == BASIC_PUBLISH, kinds
        return frames

    def schedule(self, targets, rate: float, seconds: float) -> dict:
        """``rate`` x ``seconds`` heartbeats to ``targets`` in turn, the i-th due at
        start + i/rate and signed with that time as ``sent``; built, signed and encoded to
        their AMQP frames now, before the start, so that sending one (``send``) costs this
        process a socket write: the guests' own CPU is on their own hosts, not on the two
        cores the conductor, RabbitMQ and PostgreSQL share here. A message sent late keeps
        its scheduled ``sent``: send->commit includes the publisher's lag."""
        from workers.guestagent.client import build_message

        from dbaas import wire
        total = int(rate * seconds)

        def messages(start, count):
            for i in range(count):
                instance_id, secret = targets(i)
                yield instance_id, start + i / rate, secret

        def encode(plan):
            return self.wire_frames(
                build_message(instance_id, secret, 1, wire.HEARTBEAT_TASK,
                              [instance_id, {"service_status": "running", "guest_agent_version": "1.0"}, sent])
                for instance_id, sent, secret in plan)

        probe = time.perf_counter()
        encode(messages(time.time(), 200))
        per_message = (time.perf_counter() - probe) / 200
        start = time.time() + 1.5 * per_message * total + 0.5
        plan = list(messages(start, total))
        frames = encode(plan)
        if time.time() > start:
            log(f"building {total} messages overran their schedule by {time.time() - start:.2f}s")
        return {"start": start, "due": [sent for _, sent, _ in plan], "frames": frames,
                "sent": [(instance_id, sent) for instance_id, sent, _ in plan]}

    def send(self, schedule: dict) -> dict:
        """Each of ``schedule``'s messages written at its due time (those already due
        together). Returns what was sent, how late, and the rate achieved."""
        due, frames, total = schedule["due"], schedule["frames"], len(schedule["due"])
        write = self.publisher.connection.connection.transport.write
        lags, first_write, i = [], None, 0
        while i < total:
            now = time.time()
            if due[i] > now:
                time.sleep(due[i] - now)
                continue
            j = i
            while j < total and due[j] <= now:
                lags.append(now - due[j])
                j += 1
            write(b"".join(frames[i:j]))
            first_write = first_write or now
            i = j
        last_write = time.time()
        return {"sent": schedule["sent"], "lags": sorted(lags),
                "achieved_rate": (total - 1) / (last_write - first_write) if total > 1 else float("nan")}

    def wait_applied(self, instance_id: str, sent: float, conductors, what: str, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.sql("SELECT sent FROM watermarks WHERE kind = 'heartbeat' AND key = %s", (instance_id,))
            if rows and rows[0][0] >= sent - 1e-6 and self.depth()[0] == 0:
                return time.time()
            for conductor in conductors:
                conductor.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{conductors[0].log_tail()}")
            time.sleep(0.02)

    def commit_latencies(self, sends: list[tuple[str, float]], commit_times: dict) -> tuple[list, int]:
        """[(sent, send->commit ms)] per message: the transaction that applied it (bench_applied),
        or, for one superseded by a newer heartbeat of its instance in the same batch, the
        transaction that applied that newer one."""
        if not sends:
            return [], 0
        low = min(s for _, s in sends) - 1e-6
        applied: dict[str, list] = {}
        for key, sent, xid in self.sql("SELECT key, sent, xid FROM bench_applied WHERE sent >= %s", (low,)):
            applied.setdefault(key, []).append((sent, xid))
        for rows in applied.values():
            rows.sort()
        latencies, missing = [], 0
        self.last_xids = set()
        for instance_id, sent in sends:
            rows = applied.get(instance_id, [])
            match = next((xid for s, xid in rows if s >= sent - 1e-7), None)
            if match is None or match not in commit_times:
                missing += 1
                continue
            self.last_xids.add(match)
            latencies.append((sent, (commit_times[match] - sent) * 1000))
        return latencies, missing

    def latency(self) -> dict:
        opts = self.opts
        self.install_commit_triggers()
        fleet = list(self.fleet.items())
        cursor = [0]

        def targets(_i):
            item = fleet[cursor[0] % len(fleet)]
            cursor[0] += 1
            return item

        conductors = self.start_conductors(1, "latency")
        listener = self.start_listener(conductors, "latency")
        phases = []
        profiler = None
        try:
            warm = self.send(self.schedule(targets, opts.rates[0][0], 2.0))
            self.wait_applied(*warm["sent"][-1], conductors, "the warm-up heartbeats")
            for rate, seconds in opts.rates:
                if opts.profile:
                    profiler = Profiler(conductors[0].pid, Path(opts.profile) / f"latency-{rate}.txt")
                    self.helpers.append(profiler)
                schedule = self.schedule(targets, rate, seconds)
                time.sleep(max(0.0, schedule["start"] - time.time() - 0.05))
                acct = self.accounting(conductors, [listener.process.pid])
                phase_start = schedule["start"]
                sent = self.send(schedule)
                sending_end = time.time()
                applied_at = self.wait_applied(*sent["sent"][-1], conductors, f"every heartbeat at {rate}/s")
                cpu = acct.delta()
                if profiler:
                    profiler.stop()
                    self.helpers.remove(profiler)
                phases.append({"rate": rate, "seconds": seconds, "phase_start": phase_start,
                               "sending_end": sending_end, "applied_at": applied_at, "cpu": cpu,
                               "sent": sent, "profile": str(profiler.out) if profiler else None})
                profiler = None
                log(f"latency {rate}/s x {seconds}s sent (achieved {sent['achieved_rate']:.0f}/s); "
                    f"all applied {applied_at - sending_end:.2f}s after the last send; {split_text(cpu)}")
                time.sleep(1.0)
        finally:
            if profiler and profiler in self.helpers:
                profiler.stop()
                self.helpers.remove(profiler)
            listener.stop()
            self.helpers.remove(listener)
            problems = log_problems(conductors[0].log_text())
            self.stop_conductors(conductors)
        commit_times, samples = listener.read()
        results = []
        for phase in phases:
            sends = phase["sent"]["sent"]
            pairs, missing = self.commit_latencies(sends, commit_times)
            latencies = [lat for _s, lat in pairs]
            t0, t1 = phase["phase_start"], phase["sending_end"]
            depth = [(t - t0, ready) for t, ready, *_ in samples if t0 <= t <= t1 + 0.25]
            after = [(t - t0, ready) for t, ready, *_ in samples if t1 < t <= phase["applied_at"]]
            tail = [p for p in depth if p[0] >= (t1 - t0) / 3]
            grow = slope(tail)
            end_depth = depth[-1][1] if depth else float("nan")
            per_5s = []
            for start in range(0, int(phase["seconds"]), 5):
                window = sorted(lat for s, lat in pairs if start <= s - t0 < start + 5)
                cores = [sample[3:] for sample in samples if start <= sample[0] - t0 < start + 5]
                ready = [sample[1] for sample in samples if start <= sample[0] - t0 < start + 5]
                per_5s.append({"from_s": start, "p50": percentile(window, 50), "p99": percentile(window, 99),
                               "max_depth": max(ready, default=float("nan")),
                               "cores": [sum(c[k] for c in cores) / len(cores) if cores else float("nan")
                                         for k in range(len(CATEGORIES) + 1)]})
            lags = phase["sent"]["lags"]
            result = {
                "rate": phase["rate"], "seconds": phase["seconds"], "published": len(sends),
                "achieved_rate": phase["sent"]["achieved_rate"],
                "publisher_lag_ms": {"p99": percentile(lags, 99) * 1000, "max": lags[-1] * 1000 if lags else float("nan")},
                "commit_ms": stats(latencies), "missing_commit_times": missing,
                "depth": {"max": max((r for _, r in depth), default=float("nan")), "at_end_of_sending": end_depth,
                          "slope_per_s": grow, "samples": len(depth)},
                "queue_grew": bool(grow > max(10.0, 0.01 * phase["rate"]) and end_depth > self.prefetch),
                "drained_after_s": phase["applied_at"] - t1,
                "max_depth_after": max((r for _, r in after), default=0),
                "cpu": phase["cpu"], "msgs_per_commit": len(pairs) / max(1, len(self.last_xids)),
                "conductor_us_per_msg": phase["cpu"]["cpu_s"]["conductors"] / len(sends) * 1e6,
                "rabbitmq_us_per_msg": phase["cpu"]["cpu_s"]["rabbitmq"] / len(sends) * 1e6,
                "postgres_us_per_msg": phase["cpu"]["cpu_s"]["postgres"] / len(sends) * 1e6,
                "bench_us_per_msg": phase["cpu"]["cpu_s"]["bench"] / len(sends) * 1e6,
                "per_5s": per_5s, "profile": phase["profile"],
            }
            results.append(result)
            c = result["commit_ms"]
            log(f"latency {result['rate']}/s: p50 {c['p50']:.1f} p90 {c['p90']:.1f} p99 {c['p99']:.1f} "
                f"max {c['max']:.1f} ms; depth max {result['depth']['max']}, at end {end_depth}, slope "
                f"{grow:.0f}/s -> {'GREW' if result['queue_grew'] else 'did not grow'}; missing {missing}")
        return {"phases": results, "log_problems": problems}

    # ------------------------------------------------------------------ refusals

    def hostile_context(self) -> hostile.Context:
        return hostile.Context(self.drain, self.deleted, self.opts.oversized_bytes, self.monitor.userid)

    def refusals(self) -> dict:
        """Per kind: one conductor frozen while N hostile messages of that kind are
        published, thawed, timed until it has logged N refusals and nothing is ready.
        Kinds share a conductor unless they need other settings (hostile.KIND_ENV)."""
        results, alive, problems = {}, True, []
        groups: dict[tuple, list[str]] = {}
        for kind in self.opts.refusal_kinds:
            groups.setdefault(tuple(sorted(hostile.KIND_ENV.get(kind, {}).items())), []).append(kind)
        for env, kinds in groups.items():
            conductors = self.start_conductors(1, "refusals", probe=not env, **dict(env))
            conductor = conductors[0]
            try:
                if env:   # no valid probe passes this conductor's checks: wait for a refusal
                    self.publisher.producer.publish(**hostile.KINDS[kinds[0]](self.hostile_context(), 0))
                    self.wait_refused(conductor, 1)
                for kind in kinds:
                    results[kind] = self.refusal_kind(conductor, kind)
                if not env:   # still serving: a valid heartbeat after all of that is applied
                    self.probe(conductors)
                alive &= conductor.alive()
            finally:
                problems += [p for p in log_problems(conductor.log_text()) if "refused" not in p]
                self.stop_conductors(conductors)
        return {"kinds": results, "alive_after": alive, "log_problems": problems}

    def wait_refused(self, conductor: Conductor, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while conductor.refused() < count:
            conductor.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no refusal logged:\n{conductor.log_tail()}")
            time.sleep(0.02)

    def refusal_kind(self, conductor: Conductor, kind: str) -> dict:
        ctx = self.hostile_context()
        build = hostile.KINDS[kind]
        messages = [build(ctx, i) for i in range(self.opts.refusal_messages)]
        n = len(messages)
        base = conductor.refused()
        offset = conductor._offset
        conductor.freeze()
        pub = self.publish_all(messages, held=self.prefetch, consumers=[conductor])
        acct = self.accounting([conductor])
        started = time.perf_counter()
        conductor.thaw()
        deadline = time.monotonic() + max(120.0, n / 20)
        while True:
            refused = conductor.refused() - base
            if refused >= n and self.depth()[0] == 0:
                break
            conductor.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: {refused}/{n} refused:\n{conductor.log_tail()}")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        cpu = acct.delta()
        with open(conductor.log_path, "rb") as f:
            f.seek(offset)
            lines = [line for line in f.read().decode(errors="replace").splitlines()
                     if "on the guests' queue" in line]
        reasons = Counter(hostile.reason_of(line) for line in lines)
        unexpected = sum(1 for line in lines if not any(e in line for e in hostile.EXPECTED[kind]))
        r = {
            "messages": n, "rate": n / elapsed, "seconds": elapsed, "refused": refused,
            "bytes_per_msg": sum(len(m["body"]) for m in messages) / n,
            "conductor_us_per_msg": cpu["cpu_s"]["conductors"] / n * 1e6,
            "rabbitmq_us_per_msg": cpu["cpu_s"]["rabbitmq"] / n * 1e6,
            "postgres_us_per_msg": cpu["cpu_s"]["postgres"] / n * 1e6,
            "cpu": cpu, "memory": conductor.memory(), "publish": pub,
            "reasons": dict(reasons.most_common(6)), "unexpected_reasons": unexpected,
        }
        log(f"refusals {kind:18s}: {r['rate']:6.0f}/s ({n} in {elapsed:.2f}s; conductor "
            f"{r['conductor_us_per_msg']:.0f} us/msg, RabbitMQ {r['rabbitmq_us_per_msg']:.0f}; "
            f"RSS {r['memory']['rss_kb'] // 1024} MB); {split_text(cpu)}; reasons "
            f"{dict(reasons.most_common(3))}{'; UNEXPECTED ' + str(unexpected) if unexpected else ''}")
        return r

    # ------------------------------------------------------------------ flood

    def flood(self) -> dict:
        """20,000 hostile messages of mixed kinds queued (the conductor frozen meanwhile);
        from the thaw, valid heartbeats at --flood-valid-rate until the flood is drained."""
        opts = self.opts
        self.install_commit_triggers()
        ctx = self.hostile_context()
        kinds = [k for k in hostile.KINDS if k not in hostile.KIND_ENV]
        messages = [hostile.KINDS[kinds[i % len(kinds)]](ctx, i // len(kinds)) for i in range(opts.flood_messages)]
        random.shuffle(messages)
        n = len(messages)
        conductors = self.start_conductors(1, "flood")
        conductor = conductors[0]
        listener = self.start_listener(conductors, "flood")
        valid = list(self.drain.items())
        try:
            base = conductor.refused()
            conductor.freeze()
            pub = self.publish_all(messages, held=self.prefetch, consumers=conductors)
            memory_before = conductor.memory()
            acct = self.accounting(conductors, [listener.process.pid])
            started = time.perf_counter()
            conductor.thaw()
            peak = {"tree_rss_kb": 0}
            flood_done = {}

            def drained():
                conductor.check_alive()
                peak["tree_rss_kb"] = max(peak["tree_rss_kb"], conductor.memory()["tree_rss_kb"])
                if conductor.refused() - base >= n and self.depth()[0] == 0:
                    flood_done.setdefault("at", time.perf_counter())
                    flood_done.setdefault("epoch", time.time())
                    return True
                if time.perf_counter() - started > max(300.0, n / 20):
                    raise RuntimeError(f"flood not drained:\n{conductor.log_tail()}")
                return False

            sent = self.paced(lambda i: valid[i % len(valid)], opts.flood_valid_rate, until=drained)
            while not drained():
                time.sleep(0.005)
            elapsed = flood_done["at"] - started
            cpu = acct.delta()
            applied_at = (self.wait_applied(*sent["sent"][-1], conductors, "the valid heartbeats")
                          if sent["sent"] else time.time())
            memory_after = conductor.memory()
            refused_total = conductor.refused() - base
        finally:
            listener.stop()
            self.helpers.remove(listener)
            problems = [p for p in log_problems(conductor.log_text()) if "refused" not in p]
            self.stop_conductors(conductors)
        commit_times, _samples = listener.read()
        pairs, missing = self.commit_latencies(sent["sent"], commit_times)
        latencies = [lat for _s, lat in pairs]
        commit_epochs = sorted(s + lat / 1000 for s, lat in pairs)
        result = {
            "messages": n, "kinds": kinds, "seconds": elapsed, "rate": n / elapsed, "publish": pub,
            "valid_sent": len(sent["sent"]), "valid_rate": opts.flood_valid_rate,
            "valid_commit_ms": stats(latencies), "valid_missing_commit_times": missing,
            "last_valid_applied_after_flood_s": (commit_epochs[-1] - flood_done["epoch"]) if commit_epochs else float("nan"),
            "all_valid_applied_after_flood_s": applied_at - flood_done["epoch"],
            "refused": refused_total, "memory_before": memory_before, "memory_after": memory_after,
            "peak_tree_rss_kb": peak["tree_rss_kb"], "cpu": cpu, "log_problems": problems,
            "conductor_us_per_msg": cpu["cpu_s"]["conductors"] / n * 1e6,
        }
        c = result["valid_commit_ms"]
        log(f"flood: {n} hostile drained in {elapsed:.2f}s ({result['rate']:.0f}/s), refused {refused_total}; "
            f"{len(sent['sent'])} valid sent meanwhile: send->commit p50 {c['p50']:.0f} p99 {c['p99']:.0f} "
            f"max {c['max']:.0f} ms, last applied {result['last_valid_applied_after_flood_s']:+.2f}s after the "
            f"flood drained; conductor peak RSS {memory_after['peak_rss_kb'] // 1024} MB "
            f"(before {memory_before['rss_kb'] // 1024} MB); {split_text(cpu)}")
        return result

    # ------------------------------------------------------------------ orchestration

    def run(self) -> dict:
        opts = self.opts
        self.setup()
        self.create_instances()
        self.results["errors"] = {}
        for phase, method in (("drain", self.drain_rounds), ("scale", self.scale),
                              ("latency", self.latency), ("refusals", self.refusals), ("flood", self.flood)):
            if phase not in opts.only or (phase == "latency" and not opts.rates):
                continue
            try:
                self.results[phase] = method()
            except Exception as exc:   # one phase failing (e.g. a broker that stops reading
                # under load) must not cost the others: record it, reconnect, go on
                self.failed = True
                self.results["errors"][phase] = f"{type(exc).__name__}: {exc}"
                log(f"phase {phase} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
                self.stop_conductors(list(self.conductors))
                self.reconnect()
        return self.results

    def reconnect(self) -> None:
        from kombu import Connection

        from tests.support.guests import Publisher
        for closer in (self.publisher.close, self.monitor.release):
            try:
                closer()
            except Exception:
                pass
        self.publisher = Publisher(self.vhost.url, QUEUE)
        self.monitor = Connection(self.vhost.url)
        self.monitor_channel = self.monitor.channel()

    def drain_rounds(self) -> list:
        rounds = []
        for round_no in range(1, self.opts.rounds + 1):
            # ABBA: the raw floor first in odd rounds, the conductor first in even ones.
            entry = {}
            for kind in (["raw", "conductor"] if round_no % 2 else ["conductor", "raw"]):
                if kind == "raw":
                    entry["raw"] = self.raw_floor(f"round {round_no} raw")
                else:
                    entry["conductor"] = self.conductor_drain(1, f"round{round_no}-drain")
            entry["ratio"] = entry["conductor"]["rate"] / entry["raw"]["rate"]
            entry["steady_ratio"] = entry["conductor"]["steady_rate"] / entry["raw"]["steady_rate"]
            entry["corrected_ratio"] = entry["conductor"]["corrected_rate"] / entry["raw"]["corrected_rate"]
            log(f"round {round_no}: drain / raw floor = {entry['ratio']:.2f} (steady {entry['steady_ratio']:.2f}; "
                f"corrected for CPU waits {entry['corrected_ratio']:.2f})")
            rounds.append(entry)
        return rounds

    def scale(self) -> dict:
        results = {}
        for count in self.opts.conductors:
            if count == 1 and "drain" in self.opts.only:
                continue   # the drain rounds are this configuration
            results[count] = [self.conductor_drain(count, f"scale{count}-r{r + 1}")
                              for r in range(self.opts.scale_rounds)]
        return results


class _Helper:
    """The listener process: stopped with SIGTERM; its file read afterwards."""

    def __init__(self, process, out: Path):
        self.process, self.out = process, out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout:
            self.process.stdout.close()

    def read(self) -> tuple[dict, list]:
        """({txid: commit time}, [(time, ready, runnable, machine, *CATEGORIES cores)])"""
        commits, samples = {}, []
        for line in self.out.read_text().splitlines():
            parts = line.split()
            if parts[0] == "C":
                commits.setdefault(int(parts[1]), float(parts[2]))
            elif parts[0] == "S":
                samples.append((float(parts[1]), int(parts[2]), int(parts[3]), *map(float, parts[4:])))
        return commits, samples


# ---------------------------------------------------------------------- report

def _fmt(values, spec="{:.0f}") -> str:
    return "[" + ", ".join(spec.format(v) for v in values) + "]"


def runqueue_share(cpu: dict, prefix: str) -> float:
    """Mean share of the wall time the given main threads spent runnable but waiting for a CPU."""
    waits = [t["runqueue"] for label, t in cpu.get("threads", {}).items() if label.startswith(prefix)]
    return sum(waits) / len(waits) if waits else 0.0


def limit_of(cpu: dict) -> str:
    """Name what limited a drain, from the CPU split and the conductors' main threads
    (where the guests' consumer runs): on a CPU, waiting for one, or blocked."""
    threads = [t for label, t in cpu.get("threads", {}).items() if label.startswith("conductor")]
    on_cpu = sum(t["cpu"] for t in threads) / len(threads) if threads else 0.0
    runq = sum(t["runqueue"] for t in threads) / len(threads) if threads else 0.0
    blocked = sum(t["blocked"] for t in threads) / len(threads) if threads else 0.0
    parts = {"conductors": cpu["conductors"], "RabbitMQ": cpu["rabbitmq"], "PostgreSQL": cpu["postgres"],
             "other processes": cpu["other"], "the bench": cpu["bench"]}
    ranked = ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
    where = f"conductor main thread(s): {on_cpu:.0%} on a CPU, {runq:.0%} waiting for a CPU, {blocked:.0%} blocked"
    if on_cpu >= 0.85:
        verdict = "the conductor (its single consumer thread is CPU-bound)"
    elif runq >= max(0.2, blocked):
        verdict = (f"CPU: the machine's {CPUS} cores are busy ({cpu['machine']:.2f}) and the conductor "
                   f"waits for a core (cores by user: {ranked})")
    elif blocked >= 0.3:
        verdict = ("the conductor's waits: its one thread is blocked on the broker or the database "
                   "(round trips, not CPU)")
    else:
        verdict = f"mixed (cores by user: {ranked})"
    return f"{verdict}; {where}"


def print_summary(results: dict, opts) -> None:
    line = "=" * 110
    print("\n" + line)
    print(f"conductor heartbeat benchmark (issue 12; refusals: issue 6) - {CPUS} CPUs, shared machine: "
          f"'other' is everyone else's load in the same window")
    print(f"settings: {results.get('settings', '')}")
    print(f"product code: {results.get('product', '')}")
    print(line)
    ok = True
    drain = results.get("drain") or []
    if drain:
        c_rates = [r["conductor"]["rate"] for r in drain]
        r_rates = [r["raw"]["rate"] for r in drain]
        ratios = [r["ratio"] for r in drain]
        s_ratios = [r["steady_ratio"] for r in drain]
        verdict = "MET" if median(ratios) >= 0.8 else "NOT MET"
        print(f"(1) DRAIN of {drain[0]['conductor']['messages']:,} pre-published heartbeats, "
              f"{opts.instances:,} instances, one conductor, {len(drain)} rounds ABBA")
        print(f"    conductor        {median(c_rates):7.0f} msg/s  rounds {_fmt(c_rates)}  steady "
              f"{_fmt([r['conductor']['steady_rate'] for r in drain])}")
        print(f"    raw broker floor {median(r_rates):7.0f} msg/s  rounds {_fmt(r_rates)}  steady "
              f"{_fmt([r['raw']['steady_rate'] for r in drain])}  (kombu, ack per message, prefetch "
              f"{drain[0]['raw']['prefetch']})")
        print(f"    drain / raw floor  {median(ratios):.2f}  rounds {_fmt(ratios, '{:.2f}')}; steady "
              f"{_fmt(s_ratios, '{:.2f}')}   (target >= 0.8: {verdict})")
        c_corr = [r["conductor"]["corrected_rate"] for r in drain]
        r_corr = [r["raw"]["corrected_rate"] for r in drain]
        k_ratios = [r["corrected_ratio"] for r in drain]
        print(f"    corrected for CPU waits (rate / (1 - share of the main thread's time spent waiting for a CPU)): "
              f"conductor {_fmt(c_corr)}, raw {_fmt(r_corr)}, ratio {median(k_ratios):.2f} {_fmt(k_ratios, '{:.2f}')}")
        print("    (on a shared machine the measured ratio swings with the neighbours' load; the corrected one "
              "less, as long as they leave RabbitMQ and PostgreSQL their CPU)")
        for r_no, r in enumerate(drain, 1):
            for kind in ("raw", "conductor"):
                print(f"    CPU round {r_no} {kind:9s}: {split_text(r[kind]['cpu'])}")
                print(f"    {'':21s}{threads_text(r[kind]['cpu'])}")
        checks = [r["conductor"] for r in drain]
        good = all(c["ok"] for c in checks)
        ok &= good
        print(f"    correctness: {'OK' if good else 'FAILED'} - every instance at its newest message "
              f"(watermark and status), queue empty after stop, no refusal/error in the log "
              + " ".join(f"{c['mismatches'] or ''}{c['log_problems'] or ''}left={c['left_in_queue']}" for c in checks))
        print(f"    ~messages per commit {_fmt([c['msgs_per_commit'] for c in checks])}; conductor "
              f"start-up to consuming {_fmt([c['startup_s'][0]['consumer_s'] for c in checks], '{:.1f}')} s")
        cost = {k: median([c[k] for c in checks]) for k in
                ("conductor_us_per_msg", "conductor_main_us_per_msg", "rabbitmq_us_per_msg", "postgres_us_per_msg")}
        pub_rabbit = median([c["publish"]["rabbitmq_us_per_msg"] for c in checks])
        raw_rabbit = median([r["raw"]["rabbitmq_us_per_msg"] for r in drain])
        raw_consumer = median([r["raw"]["consumer_us_per_msg"] for r in drain])
        print("(4) PER-HEARTBEAT COST (median of the drains, CPU us per message)")
        print(f"    conductor {cost['conductor_us_per_msg']:.0f} us (main process {cost['conductor_main_us_per_msg']:.0f}) | "
              f"RabbitMQ {cost['rabbitmq_us_per_msg']:.0f} us delivering+acking + {pub_rabbit:.0f} us accepting the publish | "
              f"PostgreSQL {cost['postgres_us_per_msg']:.0f} us")
        print(f"    raw floor for comparison: consumer {raw_consumer:.0f} us, RabbitMQ {raw_rabbit:.0f} us delivering "
              f"with one ack per message")
        rate = opts.fleet_size / opts.fleet_interval
        conductor_cores = cost["conductor_us_per_msg"] * rate / 1e6
        rabbit_cores = (cost["rabbitmq_us_per_msg"] + pub_rabbit) * rate / 1e6
        pg_cores = cost["postgres_us_per_msg"] * rate / 1e6
        per_core = 1e6 / cost["conductor_us_per_msg"]
        per_process = 1e6 / cost["conductor_main_us_per_msg"]
        print(f"    SIZING {opts.fleet_size:,} instances / {opts.fleet_interval:g} s = {rate:,.0f} heartbeats/s: "
              f"conductors {conductor_cores:.1f} cores, RabbitMQ {rabbit_cores:.1f}, PostgreSQL {pg_cores:.1f} "
              f"= {conductor_cores + rabbit_cores + pg_cores:.1f} cores")
        print(f"    one conductor core = {per_core:,.0f} heartbeats/s = {per_core * opts.fleet_interval:,.0f} instances "
              f"at {opts.fleet_interval:g} s; one conductor process (one consumer thread) tops out near "
              f"{per_process:,.0f}/s -> >= {math.ceil(rate / per_process)} processes, each on a core of its own")
        print(f"    at Trove's 60 s interval the same fleet is {opts.fleet_size / 60:,.0f}/s: "
              f"{conductor_cores * opts.fleet_interval / 60:.2f} conductor cores")
        for p in (results.get("latency") or {}).get("phases", []):
            steady_cores = (p["conductor_us_per_msg"] + p["rabbitmq_us_per_msg"] + p["postgres_us_per_msg"]) * rate / 1e6
            print(f"    steady {p['rate']}/s (~{p['msgs_per_commit']:.0f} msgs/commit, one message per publish): conductor "
                  f"{p['conductor_us_per_msg']:.0f} us, RabbitMQ {p['rabbitmq_us_per_msg']:.0f} us (accept + deliver), "
                  f"PostgreSQL {p['postgres_us_per_msg']:.0f} us, publisher {p['bench_us_per_msg']:.0f} us per message "
                  f"-> {steady_cores:.1f} cores at {rate:,.0f}/s (conductor+RabbitMQ+PostgreSQL)")
        print("    RabbitMQ's cost of the guests themselves (two connections, a user and a queue each): "
              "bench/guests.py")
    scale = results.get("scale") or {}
    if scale or drain:
        print("(3) SCALE-OUT: the same drain, N conductor processes on the queue")
        rows = []
        if drain:
            rows.append((1, [r["conductor"] for r in drain], "(the drain rounds)"))
        rows += [(int(k), v, "") for k, v in sorted(scale.items(), key=lambda kv: int(kv[0]))]
        for count, runs, note in rows:
            rates = [x["rate"] for x in runs]
            cpu = runs[-1]["cpu"]
            print(f"    {count} conductor(s): {median(rates):6.0f} msg/s {_fmt(rates)} {note}; "
                  f"conductors {median([x['conductor_us_per_msg'] for x in runs]):.0f} us/msg; "
                  f"main process each {_fmt(cpu['conductor_main'], '{:.2f}')} cores")
            print(f"        CPU: {split_text(cpu)}")
            print(f"        limit: {limit_of(cpu)}")
            ok &= all(x["ok"] for x in runs)
    lat = results.get("latency")
    if lat:
        print("(2) LATENCY send->commit at steady rates (one conductor; messages built beforehand, each signed "
              "with its scheduled send time as sent, and written then)")
        for p in lat["phases"]:
            c, d = p["commit_ms"], p["depth"]
            target = 50 if p["rate"] <= 1000 else 200
            verdict = "MET" if c["p99"] <= target and not p["queue_grew"] else "NOT MET"
            print(f"    {p['rate']:5d}/s x {p['seconds']}s: achieved {p['achieved_rate']:.0f}/s (lag p99 "
                  f"{p['publisher_lag_ms']['p99']:.1f} ms); p50 {c['p50']:.1f} p90 {c['p90']:.1f} p99 {c['p99']:.1f} "
                  f"max {c['max']:.1f} ms; queue depth max {d['max']}, at end {d['at_end_of_sending']}, "
                  f"slope {d['slope_per_s']:+.0f}/s -> {'GREW' if p['queue_grew'] else 'did not grow'}; "
                  f"(target p99 <= {target} ms, no growth: {verdict})")
            print(f"        CPU: {split_text(p['cpu'])}")
            print(f"        {threads_text(p['cpu'])}; ~{p['msgs_per_commit']:.0f} msgs/commit; "
                  f"missing commit times {p['missing_commit_times']}; all applied {p['drained_after_s']:.2f} s "
                  f"after the last send")
            print("        per 5 s: p50/p99 ms | max depth | cores machine conductors rabbitmq postgres bench other")
            for w in p["per_5s"]:
                print(f"        {w['from_s']:3d}s {w['p50']:7.1f} {w['p99']:7.1f} | {w['max_depth']:6} | "
                      + " ".join(f"{v:4.2f}" for v in w["cores"]))
        ok &= not lat["log_problems"]
    ref = results.get("refusals")
    if ref:
        print("REFUSALS per kind (issue 6; one conductor; target >= 2,000/s each)")
        for kind, r in ref["kinds"].items():
            verdict = "MET" if r["rate"] >= 2000 else "NOT MET"
            per_core = 1e6 / r["conductor_us_per_msg"] if r["conductor_us_per_msg"] else float("nan")
            print(f"    {kind:18s} {r['rate']:6.0f}/s ({r['messages']} x {r['bytes_per_msg']:,.0f} B) conductor "
                  f"{r['conductor_us_per_msg']:4.0f} us/msg (= {per_core:,.0f}/s per conductor core), RabbitMQ "
                  f"{r['rabbitmq_us_per_msg']:4.0f}, PostgreSQL {r['postgres_us_per_msg']:3.0f}; RSS "
                  f"{r['memory']['rss_kb'] // 1024} MB; {verdict}"
                  f"{'; UNEXPECTED REASONS ' + str(r['unexpected_reasons']) if r['unexpected_reasons'] else ''}")
            print(f"        CPU: {split_text(r['cpu'])}")
        print(f"    conductor alive and applying a valid heartbeat afterwards: {ref['alive_after']}")
        ok &= ref["alive_after"] and not ref["log_problems"] and not any(
            r["unexpected_reasons"] or r["refused"] != r["messages"] for r in ref["kinds"].values())
    fl = results.get("flood")
    if fl:
        c = fl["valid_commit_ms"]
        print(f"FLOOD: {fl['messages']:,} hostile messages of {len(fl['kinds'])} kinds queued, valid heartbeats at "
              f"{fl['valid_rate']}/s from the thaw")
        print(f"    drained in {fl['seconds']:.2f} s ({fl['rate']:.0f}/s), {fl['refused']} refused; {fl['valid_sent']} valid "
              f"sent meanwhile: send->commit p50 {c['p50']:.0f} p99 {c['p99']:.0f} max {c['max']:.0f} ms; last valid "
              f"applied {fl['last_valid_applied_after_flood_s']:+.2f} s after the flood drained")
        print(f"    conductor RSS {fl['memory_before']['rss_kb'] // 1024} MB before, peak {fl['memory_after']['peak_rss_kb'] // 1024} MB "
              f"(main process; whole tree peak sampled {fl['peak_tree_rss_kb'] // 1024} MB)")
        print(f"    conductor {fl['conductor_us_per_msg']:.0f} us per hostile message (valid ones' work included); "
              f"CPU: {split_text(fl['cpu'])}")
        ok &= fl["refused"] == fl["messages"] and not fl["log_problems"] and fl["valid_missing_commit_times"] == 0
    for phase, error in (results.get("errors") or {}).items():
        print(f"PHASE {phase} FAILED: {error[:400]}")
        ok = False
    print(f"CORRECTNESS overall: {'OK' if ok else 'FAILED'}")
    print(line)
    if opts.profile:
        paths = [r["conductor"].get("profile") for r in drain]
        paths += [x.get("profile") for runs in scale.values() for x in runs]
        paths += [p.get("profile") for p in (lat or {}).get("phases", [])]
        for path in filter(None, paths):
            print(f"\nprofile of the conductor's main process, {path}:")
            print(summarize_profile(Path(path)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"phases to run, comma-separated (default all: {','.join(PHASES)})")
    parser.add_argument("--instances", type=int, default=1000, help="instances of the drains (M)")
    parser.add_argument("--messages", type=int, default=20000, help="heartbeats per drain (N)")
    parser.add_argument("--rounds", type=int, default=2, help="drain rounds, ABBA with the raw floor")
    parser.add_argument("--conductors", default="1,2,3", help="scale-out configurations")
    parser.add_argument("--scale-rounds", type=int, default=1, help="drains per scale-out configuration")
    parser.add_argument("--rates", default="1000:15,3000:30", help="latency phases, RATE:SECONDS,...")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0,
                        help="latency phase: each instance beats this often (instances = max rate x this)")
    parser.add_argument("--fleet", type=int, help="latency instances (default: max rate x interval)")
    parser.add_argument("--refusal-messages", type=int, default=5000, help="hostile messages per kind")
    parser.add_argument("--refusal-kinds", default=",".join(hostile.KINDS), help="kinds to measure")
    parser.add_argument("--oversized-bytes", type=int, default=70000, help="junk in an oversized message")
    parser.add_argument("--flood-messages", type=int, default=20000)
    parser.add_argument("--flood-valid-rate", type=float, default=200.0,
                        help="valid heartbeats per second during the flood")
    parser.add_argument("--deleted", type=int, default=100, help="deleted instances whose guests go on sending")
    parser.add_argument("--batch-size", type=int, help="DBAAS_HEARTBEAT_BATCH_SIZE for the conductors")
    parser.add_argument("--batch-interval", type=float, help="DBAAS_HEARTBEAT_BATCH_INTERVAL (s)")
    parser.add_argument("--fleet-size", type=int, default=100_000, help="sizing line: instances")
    parser.add_argument("--fleet-interval", type=float, default=10.0, help="sizing line: heartbeat interval (s)")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy record the conductor's main process during drains and latency phases")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep database, vhost and logs")
    parser.add_argument("--seed", type=int)
    opts = parser.parse_args(argv)
    opts.only = [p.strip() for p in opts.only.split(",") if p.strip()]
    unknown = set(opts.only) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}")
    opts.conductors = [int(x) for x in opts.conductors.split(",") if x.strip()]
    opts.rates = [(int(r), float(s)) for r, s in (x.split(":") for x in opts.rates.split(",") if x.strip())]
    opts.refusal_kinds = [k.strip() for k in opts.refusal_kinds.split(",") if k.strip()]
    unknown = set(opts.refusal_kinds) - set(hostile.KINDS)
    if unknown:
        parser.error(f"unknown refusal kinds {sorted(unknown)}; known: {list(hostile.KINDS)}")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.seed is not None:
        random.seed(opts.seed)
    if opts.profile:
        Path(opts.profile).mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally blocks
    bench = Bench(opts)
    product = product_tree()
    log(f"product code: {product}")
    started = time.monotonic()
    try:
        results = bench.run()
        results["product"] = product
        results["settings"] = (f"DBAAS_HEARTBEAT_BATCH_SIZE={bench.config.heartbeat_batch_size}, "
                               f"DBAAS_HEARTBEAT_BATCH_INTERVAL={bench.config.heartbeat_batch_interval}, "
                               f"guests' prefetch {bench.prefetch}; conductor = celery -A dbaas worker -Q "
                               f"trove-conductor (default concurrency {CPUS}, default log level)")
    except BaseException:
        bench.failed = True
        raise
    finally:
        bench.teardown()
    results["total_seconds"] = time.monotonic() - started
    print_summary(results, opts)
    print(f"total {results['total_seconds']:.0f} s")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
