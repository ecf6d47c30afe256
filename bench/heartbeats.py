#!/usr/bin/env python
"""Conductor heartbeat benchmark on real RabbitMQ + PostgreSQL, real worker processes.

    . .venv/bin/activate
    python bench/heartbeats.py [--instances 1000] [--messages 20000] [--rate 1000] [--seconds 15]

One run, with its own throw-away PostgreSQL database and RabbitMQ vhost (both dropped at
the end), measures:

1. raw broker floor: a plain kombu consumer that only acks N Celery-format messages;
2. Celery floor: N pre-published ``conductor.noop`` tasks (bench/noop_app.py: the
   conductor's own app, queue and settings, a task that does nothing) drained by
   ``celery -A bench.noop_app worker -Q trove-conductor``;
3. heartbeats: N pre-published signed heartbeats (shuffled, strictly increasing ``sent``
   per instance) drained by the product command ``celery -A dbaas worker -Q
   trove-conductor``; then a correctness check of every instance;
4. latency: a conductor running, heartbeats published at a steady R/s for S seconds,
   each to an instance of its own; send-to-commit latency per message.

Floor and heartbeat drains are repeated ``--rounds`` times in ABBA order (floor first in
odd rounds, heartbeats first in even rounds) so drift on a shared machine hits both.

Timing of a drain starts when the worker's consumer appears on the queue (or the queue
starts to shrink, whichever is seen first; polled every 5 ms) and ends when every
message is done: for the floor, the no-op tasks have counted N completions; for
heartbeats, every instance's watermark is at its newest ``sent`` and no message is
left ready in the queue. A "steady" rate over the middle 80 % of the queue (ready count
going from 90 % to 10 % of N) is reported too: it leaves out worker start-up and tail.

Latency: a statement-level trigger on ``watermarks`` (created in the bench database only,
for phase 4) calls ``pg_notify`` with the writing transaction's id; NOTIFY is delivered
at commit, so a listener process records each transaction's commit time. The
transaction that applied a message is its watermark row's ``xmin`` (one message per
instance in that phase). Latency = commit time - ``sent`` (both ``time.time()`` on this
host). Also reported: ``instances.last_heartbeat - sent`` (conductor's clock when it
started the batch).

Messages are published by one kombu producer in Celery's own message format
(``app.amqp.as_task_v2`` + the ``dbaas_auth`` header ``send_signed`` adds), without
publisher confirms: Celery's ``send_task`` with confirms managed ~400-600 msg/s here,
too slow to pre-publish 20,000 messages or to sustain 1,000/s. Every pre-published
batch is checked to have fully arrived (queue depth) before a worker starts.

CPU: each drain and the latency phase report the worker's CPU per message (its process
tree, from /proc) and that of its PostgreSQL backend, and split the machine's busy cores
into worker / RabbitMQ / PostgreSQL / this bench / other processes (approximate, +-0.1
core): on a shared machine that says whether a slow figure is the conductor's or the
neighbours'. The latency phase also prints it per second.

Options ``--batch-size`` / ``--batch-interval`` set DBAAS_HEARTBEAT_BATCH_SIZE /
DBAAS_HEARTBEAT_BATCH_INTERVAL for the workers (or export those two variables);
``--variants "default,50:0.005,500:0.05"`` measures several settings (and, with a third
field, other conductor app modules) in the same run, interleaved. ``--profile DIR`` records each drain and the latency phase with
py-spy (``pip install py-spy``) on the worker's main process (floor: with its pool
children) and prints where the samples fall; profiled figures are marked as such.
"""

import argparse
import json
import os
import random
import re
import secrets as pysecrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PG_ADMIN_URL = os.environ.get("DBAAS_TEST_PG_ADMIN_URL",
                              "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
AMQP_HOST = os.environ.get("DBAAS_TEST_AMQP_HOST", "127.0.0.1:5672")
QUEUE = "trove-conductor"
RAW_QUEUE = "bench-raw"
# Non-sticky statuses (a sticky one would, by design, not be overwritten by newer ones).
STATUSES = ["running", "healthy", "shutdown", "crashed", "paused", "blocked"]
NOTIFY_CHANNEL = "bench_commit"
SAMPLE_KEYS = ("machine", "worker", "rabbitmq", "postgres", "bench", "other")
PASSTHROUGH = ("DBAAS_HEARTBEAT_BATCH_SIZE", "DBAAS_HEARTBEAT_BATCH_INTERVAL")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def median(values: list) -> float:
    values = sorted(values)
    n = len(values)
    if not n:
        return float("nan")
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


# --------------------------------------------------------------------------- CPU accounting

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1


def process_cpu(pid: int, descendants: bool = True) -> float:
    """CPU seconds (user + system) of ``pid`` and, by default, its living descendants."""
    total, stack, seen = 0.0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            if descendants:
                for task in os.listdir(f"/proc/{current}/task"):
                    with open(f"/proc/{current}/task/{task}/children") as children:
                        stack.extend(int(c) for c in children.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    idle = values[3] + values[4]
    total = sum(values)
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def _comm_pids() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as comm:
                    found.setdefault(comm.read().strip(), []).append(int(entry))
            except OSError:
                pass
    return found


class CpuBreakdown:
    """Who used the machine's CPU between two calls of ``delta()``: the worker's process
    tree, the bench's own processes (publisher/poller and the commit listener), RabbitMQ
    (the whole node), PostgreSQL (the whole cluster) and everything else."""

    def __init__(self, worker_pid: int, bench_pids: list[int]):
        self.worker_pid, self.bench_pids = worker_pid, bench_pids
        self.last = self._snapshot(first=True)

    def _snapshot(self, first: bool = False) -> dict:
        comms = _comm_pids()
        return {
            "time": time.perf_counter(), "machine": machine_cpu(),
            "worker": process_cpu(self.worker_pid),
            "bench": sum(process_cpu(pid, descendants=False) for pid in self.bench_pids),
            "rabbitmq": {pid: process_cpu(pid, False) for pid in comms.get("beam.smp", [])},
            "postgres": {pid: process_cpu(pid, False) for pid in comms.get("postgres", [])},
        }

    def delta(self) -> dict:
        now, last = self._snapshot(), self.last
        self.last = now
        wall = now["time"] - last["time"]
        busy = now["machine"][0] - last["machine"][0]
        total = now["machine"][1] - last["machine"][1]
        cores = {"wall": wall,
                 "machine": busy / total * CPUS if total > 0 else float("nan")}
        for key in ("worker", "bench"):
            cores[key] = (now[key] - last[key]) / wall
        for key in ("rabbitmq", "postgres"):
            cpu = sum(value - last[key].get(pid, 0.0) for pid, value in now[key].items())
            cores[key] = cpu / wall
        cores["other"] = cores["machine"] - sum(cores[k] for k in ("worker", "bench", "rabbitmq",
                                                                   "postgres"))
        return cores


def _breakdown_text(cores: dict) -> str:
    return (f"machine busy {cores['machine']:.2f}/{CPUS} cores = worker {cores['worker']:.2f} + "
            f"RabbitMQ {cores['rabbitmq']:.2f} + PostgreSQL {cores['postgres']:.2f} + bench "
            f"{cores['bench']:.2f} + other processes {cores['other']:.2f}")


class CpuWindow:
    """CPU used between start() and stop(): by a worker's process tree, by the PostgreSQL
    backends serving the bench database (the worker's connections), and by the machine."""

    def __init__(self, bench, worker_pid: int, extra_pids: list[int] = ()):
        self.bench, self.pid = bench, worker_pid
        self.extra_pids = list(extra_pids)

    def _backends(self) -> dict[int, float]:
        pids = [pid for (pid,) in self.bench.sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.bench.database.name,))]
        return {pid: process_cpu(pid, descendants=False) for pid in pids}

    def start(self) -> "CpuWindow":
        self.t0 = time.perf_counter()
        self.worker0 = process_cpu(self.pid)
        self.backends0 = self._backends()
        self.machine0 = machine_cpu()
        self.breakdown = CpuBreakdown(self.pid, [os.getpid(), *self.extra_pids])
        return self

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        worker = process_cpu(self.pid) - self.worker0
        backends = sum(cpu - self.backends0.get(pid, 0.0) for pid, cpu in self._backends().items())
        breakdown = self.breakdown.delta()
        busy1, total1 = machine_cpu()
        busy0, total0 = self.machine0
        machine_busy = (busy1 - busy0) / (total1 - total0) * CPUS if total1 > total0 else float("nan")
        return {"wall": wall, "worker_cpu_s": worker, "pg_backend_cpu_s": backends,
                "worker_cores": worker / wall if wall else float("nan"),
                "machine_busy_cores": machine_busy, "breakdown_cores": breakdown}


# --------------------------------------------------------------------------- processes

class WorkerProcess:
    """One ``celery -A <app> worker -Q trove-conductor`` process group of ours."""

    def __init__(self, app_module: str, env: dict, log_path: Path, name: str,
                 concurrency: int | None):
        self.args = [sys.executable, "-m", "celery", "-A", app_module, "worker", "-Q", QUEUE,
                     "-n", f"{name}@%h"]
        if concurrency:
            self.args += ["-c", str(concurrency)]
        self.env, self.log_path = env, log_path
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> "WorkerProcess":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"worker exited ({self.process.returncode}):\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM to our own process group), SIGKILL after ``timeout``."""
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log(f"worker {self.process.pid} ignored SIGTERM for {timeout}s; SIGKILL")
                    try:
                        os.killpg(self.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.process.wait(timeout=30)
            else:
                # The main process is gone; make sure no pool child of ours lingers.
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        finally:
            if self._log:
                self._log.close()
                self._log = None


class Profiler:
    """``py-spy record`` on a worker, stopped with SIGINT (which makes it write its file)."""

    def __init__(self, pid: int, out: Path, subprocesses: bool):
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent) + os.pathsep
                           + os.environ.get("PATH", ""))
        if exe is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        args = [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                "--output", str(out), "--nonblocking"]
        if subprocesses:
            args.append("--subprocesses")
        self.out = out
        self._stderr = open(str(out) + ".log", "wb")
        self.process = subprocess.Popen(args, stdout=self._stderr, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
        finally:
            self._stderr.close()


def summarize_profile(path: Path, top: int = 14) -> str:
    """Where the samples of a py-spy raw (collapsed) file fall: by library and by function."""
    if not path.exists():
        return f"  (no profile written: see {path}.log)"
    leaf_fn, inclusive, area = Counter(), Counter(), Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = [_strip_line(f) for f in stack.split(";")
                  if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf_fn[frames[-1]] += count
        area[_area(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "  (no samples)"
    out = [f"  {total} samples (~{total / 250:.1f} s of CPU at 250 Hz)", "  by area (leaf frame):"]
    for name, count in area.most_common():
        out.append(f"    {100 * count / total:5.1f}%  {name}")
    out.append("  top functions, self:")
    for name, count in leaf_fn.most_common(top):
        out.append(f"    {100 * count / total:5.1f}%  {name[:150]}")
    out.append("  top functions, inclusive (dbaas/workers code and big library entry points):")
    shown = 0
    for name, count in inclusive.most_common():
        if shown >= top:
            break
        if any(k in name for k in ("(dbaas/", "(workers/", "(bench/", "execute (", "commit (",
                                    "decode (", "ack (", "_write_frame", "drain_events",
                                    "compile (", "do_ping", "_receive_callback",
                                    "EventDispatcher", "send (", "publish (", "on_task_received",
                                    "apply_async", "_recv", "Request.")):
            out.append(f"    {100 * count / total:5.1f}%  {name[:150]}")
            shown += 1
    return "\n".join(out)


AREAS = [
    ("(psycopg2/", "psycopg2"),
    ("(sqlalchemy/", "SQLAlchemy (incl. psycopg2 calls and waits on PostgreSQL)"),
    ("(amqp/", "py-amqp (AMQP framing, socket I/O)"),
    ("(kombu/", "kombu"),
    ("(billiard/", "billiard (prefork pool)"),
    ("(celery/", "Celery"),
    ("(vine/", "vine"),
    ("(workers/", "workers (conductor code)"),
    ("(dbaas/", "dbaas"),
    ("(bench/", "bench"),
    ("(json/", "json"),
    ("(hmac.py", "hmac"),
    ("(logging/", "logging"),
]


def _strip_line(frame: str) -> str:
    """'func (pkg/mod.py:123)' -> 'func (pkg/mod.py)'"""
    head, sep, tail = frame.rpartition(":")
    return head + ")" if sep and tail.rstrip(")").isdigit() else frame


def _area(frames: list) -> str:
    leaf = frames[-1]
    for marker, name in AREAS:
        if marker in leaf:
            return name
    # A leaf in the standard library: attribute it to the nearest library frame above.
    for frame in reversed(frames):
        for marker, name in AREAS:
            if marker in frame:
                return f"{name} -> stdlib"
    return "other"


# --------------------------------------------------------------------------- broker

class Broker:
    """One connection for publishing (no confirms) and one for watching queue depth."""

    def __init__(self, url: str):
        from kombu import Connection, Producer

        from dbaas.queues import queue
        from workers.guestagent.client import guest_app

        self.url = url
        self.app = guest_app(url, QUEUE)  # only used to build Celery-format messages
        self.pub_conn = Connection(url, transport_options={"confirm_publish": False})
        self.pub_channel = self.pub_conn.channel()
        self.queues = {QUEUE: queue(QUEUE), RAW_QUEUE: queue(RAW_QUEUE)}
        self.producers = {}
        for name, q in self.queues.items():
            q(self.pub_channel).declare()
            self.producers[name] = Producer(self.pub_channel, exchange=q.exchange,
                                            routing_key=q.routing_key, serializer="json")
        self.mon_conn = Connection(url)
        self.mon_channel = self.mon_conn.channel()

    def publish(self, task_name: str, args: list, auth: dict, queue: str = QUEUE) -> None:
        from dbaas import wire

        task_id = str(uuid.uuid4())
        message = self.app.amqp.as_task_v2(task_id, task_name, args, {})
        headers = message.headers
        headers[wire.AUTH_HEADER] = auth
        self.producers[queue].publish(message.body, headers=headers, delivery_mode=2,
                                      **message.properties)

    def depth(self, queue: str = QUEUE) -> tuple[int, int]:
        """(messages ready, consumers) by a passive queue_declare."""
        _name, ready, consumers = self.mon_channel.queue_declare(queue, passive=True)
        return ready, consumers

    def wait_depth(self, expected: int, queue: str = QUEUE, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ready, _ = self.depth(queue)
            if ready == expected:
                return
            if ready > expected or time.monotonic() > deadline:
                raise RuntimeError(f"queue {queue} holds {ready} messages, expected {expected}")
            time.sleep(0.05)

    def close(self) -> None:
        for conn in (self.pub_conn, self.mon_conn):
            try:
                conn.release()
            except Exception:
                pass


# --------------------------------------------------------------------------- bench

class Bench:
    def __init__(self, opts):
        self.opts = opts
        self.results: dict = {"options": vars(opts).copy(), "rounds": []}
        self.work_dir = Path(tempfile.mkdtemp(prefix="dbaas-bench-"))
        self.service_key = pysecrets.token_hex(32)
        self.database = None
        self.vhost = None
        self.broker: Broker | None = None
        self.poll_conn = None
        self.workers: list[WorkerProcess] = []
        self.helpers: list = []   # listener processes / profilers to stop in finally
        self.secrets: dict[str, str] = {}
        self.latency_ids: list[str] = []
        self.failed = False
        # Read before setup() rewrites this process's DBAAS_* variables.
        self.passthrough = {k: os.environ[k] for k in PASSTHROUGH if os.environ.get(k)}

    # ----- environment

    def child_env(self, variant: tuple | None = None, **extra) -> dict:
        """Environment of a worker: ``env_for`` of tests/conftest.py, plus the batch
        settings of ``variant`` (size, interval; None keeps the default)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DBAAS_")}
        env.update(self.passthrough)
        env["PYTHONPATH"] = str(ROOT)
        env.update(DBAAS_VAR_DIR=str(self.work_dir / "var"), DBAAS_DATABASE_URL=self.database.url,
                   DBAAS_BROKER_URL=self.vhost.url, DBAAS_SERVICE_KEY=self.service_key)
        size, interval = (variant or (None, None, None))[:2]
        if size is not None:
            env["DBAAS_HEARTBEAT_BATCH_SIZE"] = str(size)
        if interval is not None:
            env["DBAAS_HEARTBEAT_BATCH_INTERVAL"] = str(interval)
        env.update(extra)
        return env

    def variant_label(self, variant: tuple) -> str:
        from dbaas import settings
        config = settings.load(self.child_env(variant))
        label = f"size={config.heartbeat_batch_size} interval={config.heartbeat_batch_interval}"
        app = variant[2] or self.opts.conductor_app
        return label if app == "dbaas" else f"{label} -A {app}"

    def conductor_app(self, label: str) -> str:
        return self.variants[label][2] or self.opts.conductor_app

    def setup(self) -> None:
        from tests.services import PostgresDatabase, RabbitVhost

        database = PostgresDatabase()
        database.name = f"dbaas_bench_{uuid.uuid4().hex[:12]}"
        database.url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database.name
        self.database = database.create()
        vhost = RabbitVhost()
        vhost.name = f"dbaas_bench_{uuid.uuid4().hex[:12]}"
        vhost.url = f"amqp://guest:guest@{AMQP_HOST}/{vhost.name}"
        self.vhost = vhost.create()
        log(f"database {database.name}, vhost {vhost.name}, work dir {self.work_dir}")

        # This process is the control plane's CLI: settings from the environment, read once.
        for key in [k for k in os.environ if k.startswith("DBAAS_")]:
            del os.environ[key]
        os.environ.update({k: v for k, v in self.child_env().items() if k.startswith("DBAAS_")})
        from dbaas import migrations, settings
        config = settings.get()
        assert config.database_url == database.url and config.broker_url == vhost.url
        self.variants = {self.variant_label(v): v for v in self.opts.variants}
        log("conductor batch settings (DBAAS_HEARTBEAT_BATCH_SIZE / _INTERVAL) measured: "
            + "; ".join(self.variants))
        migrations.upgrade()                     # `python manage.py db upgrade`
        self.broker = Broker(vhost.url)
        import psycopg2
        from sqlalchemy.engine import make_url
        url = make_url(database.url)
        self.dsn = dict(host=url.host, port=url.port or 5432, user=url.username,
                        password=url.password or "", dbname=url.database)
        self.poll_conn = psycopg2.connect(**self.dsn)
        self.poll_conn.autocommit = True

    def teardown(self) -> None:
        for helper in self.helpers:
            try:
                helper.stop()
            except Exception as exc:
                log(f"stopping helper: {exc}")
        for worker in self.workers:
            try:
                worker.stop()
            except Exception as exc:
                log(f"stopping worker: {exc}")
        if self.broker:
            self.broker.close()
        if self.poll_conn is not None:
            self.poll_conn.close()
        try:
            from dbaas import db
            if db._engine is not None:
                db._engine.dispose()
        except Exception:
            pass
        if self.database is not None and not self.opts.keep:
            try:
                self.database.drop()
            except Exception as exc:
                log(f"dropping database {self.database.name}: {exc}")
        if self.vhost is not None and not self.opts.keep:
            try:
                self.vhost.drop()
            except Exception as exc:
                log(f"deleting vhost {self.vhost.name}: {exc}")
        if self.failed or self.opts.keep:
            log(f"worker logs kept in {self.work_dir}")
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def sql(self, statement: str, params=None) -> list:
        with self.poll_conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    # ----- phase 1

    def create_instances(self) -> None:
        from dbaas import db
        from dbaas.instances import create_instance

        total = self.opts.instances + self.opts.rate * self.opts.seconds
        started = time.perf_counter()
        ids = []
        for first in range(0, total, 1000):
            with db.session_scope() as session:
                created = [create_instance(session, f"bench-{n}")
                           for n in range(first, min(total, first + 1000))]
                for instance, secret in created:
                    self.secrets[instance.id] = secret
                    ids.append(instance.id)
        self.drain_ids = ids[:self.opts.instances]
        self.latency_ids = ids[self.opts.instances:]
        log(f"created {total} instances in {time.perf_counter() - started:.1f}s "
            f"({self.opts.instances} for the drains, {len(self.latency_ids)} for latency)")

    # ----- messages

    def publish_heartbeat(self, instance_id: str, status: str, sent: float) -> None:
        from dbaas import signing, wire

        args = [instance_id, {"service_status": status, "guest_agent_version": "1.0"}, sent]
        auth = signing.auth_header(signing.instance_principal(instance_id),
                                   self.secrets[instance_id], wire.HEARTBEAT_TASK, args, {})
        self.broker.publish(wire.HEARTBEAT_TASK, args, auth)

    def publish_noops(self, count: int, queue: str = QUEUE) -> float:
        """Messages shaped like heartbeats (same args, a service signature), ``count``."""
        from dbaas import signing

        ids = self.drain_ids
        started = time.perf_counter()
        now = time.time()
        for n in range(count):
            args = [ids[n % len(ids)], {"service_status": "running", "guest_agent_version": "1.0"},
                    now + n * 1e-6]
            auth = signing.auth_header(signing.SERVICE_PRINCIPAL, self.service_key,
                                       "conductor.noop", args, {})
            self.broker.publish("conductor.noop", args, auth, queue=queue)
        self.broker.wait_depth(count, queue)
        return count / (time.perf_counter() - started)

    # ----- drains

    def start_worker(self, app_module: str, name: str, variant: tuple | None = None,
                     **env) -> WorkerProcess:
        worker = WorkerProcess(app_module, self.child_env(variant, **env),
                               self.work_dir / f"{name}.log", name, self.opts.concurrency)
        self.workers.append(worker)
        return worker.start()

    def stop_worker(self, worker: WorkerProcess) -> None:
        worker.stop()
        self.workers.remove(worker)

    def wait_consuming(self, worker: WorkerProcess, expected: int, timeout: float = 120) -> float:
        """perf_counter() when the worker's consumer is first seen (or the queue shrinks)."""
        deadline = time.monotonic() + timeout
        while True:
            ready, consumers = self.broker.depth()
            if consumers or ready < expected:
                return time.perf_counter()
            worker.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not consume within {timeout}s:\n{worker.log_tail()}")
            time.sleep(0.005)

    def drain(self, worker: WorkerProcess, count: int, done, label: str, profile: bool) -> dict:
        """Time from first consumption to ``done()`` with an empty queue."""
        profiler = None
        t0 = self.wait_consuming(worker, count)
        cpu = CpuWindow(self, worker.pid).start()
        if profile:
            profiler = Profiler(worker.pid, Path(self.opts.profile) / f"{label}.txt",
                                subprocesses=label.startswith("floor"))
            self.helpers.append(profiler)
        marks = {}
        deadline = time.monotonic() + max(180.0, count / 50)
        polls = 0
        try:
            while True:
                now = time.perf_counter()
                ready, _ = self.broker.depth()
                for fraction in (0.9, 0.1):
                    if fraction not in marks and ready <= fraction * count:
                        marks[fraction] = now
                if ready == 0:
                    marks.setdefault(0.0, now)
                    polls += 1
                    if done():
                        t_end = time.perf_counter()
                        usage = cpu.stop()
                        break
                worker.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: not done within the time limit:\n{worker.log_tail()}")
                time.sleep(0.01)
        finally:
            if profiler:
                profiler.stop()
                self.helpers.remove(profiler)
        elapsed = t_end - t0
        steady = (0.8 * count / (marks[0.1] - marks[0.9])
                  if 0.9 in marks and 0.1 in marks and marks[0.1] > marks[0.9] else float("nan"))
        result = {"seconds": elapsed, "rate": count / elapsed, "steady_rate": steady,
                  # from "no message ready in the queue" to done: the last batches
                  "tail_seconds": t_end - marks.get(0.0, t_end),
                  "done_polls": polls, "profiled": profile, "cpu": usage,
                  "worker_cpu_us_per_msg": usage["worker_cpu_s"] / count * 1e6,
                  "pg_cpu_us_per_msg": usage["pg_backend_cpu_s"] / count * 1e6}
        if profiler:
            result["profile"] = str(profiler.out)
        return result

    def floor_round(self, round_no: int) -> dict:
        n = self.opts.messages
        counter = self.work_dir / f"noop-counter-{round_no}"
        counter.touch()
        pub_rate = self.publish_noops(n)
        worker = self.start_worker("bench.noop_app", f"floor-r{round_no}",
                                   BENCH_NOOP_COUNTER=str(counter))
        try:
            result = self.drain(worker, n, lambda: counter.stat().st_size >= n,
                                f"floor-r{round_no}", bool(self.opts.profile))
        finally:
            self.stop_worker(worker)
        completions = counter.stat().st_size
        left, _ = self.broker.depth()
        errors = _log_problems(worker.log_text())
        result.update(publish_rate=pub_rate, completions=completions, left_in_queue=left,
                      log_problems=errors,
                      ok=completions == n and left == 0 and not errors)
        log(f"round {round_no} floor     : {result['rate']:8.0f} msg/s "
            f"(steady {result['steady_rate']:.0f}/s, {result['seconds']:.2f}s of which tail {result['tail_seconds']:.2f}s; {_cpu_text(result)}; published at "
            f"{pub_rate:.0f}/s; completions {completions}/{n}, left {left}"
            f"{', log: ' + '; '.join(errors) if errors else ''})")
        return result

    def reset_heartbeat_state(self) -> None:
        self.sql("TRUNCATE watermarks")
        self.sql("UPDATE instances SET service_status = NULL, service_status_updated = NULL, "
                 "last_heartbeat = NULL, guest_agent_version = NULL, task_status = 'BUILDING'")
        self.sql("VACUUM (ANALYZE) instances, watermarks, guest_credentials")

    def heartbeat_round(self, round_no: int, label: str) -> dict:
        n, ids = self.opts.messages, self.drain_ids
        self.reset_heartbeat_state()
        final = time.time() - 1.0          # every instance's newest `sent`
        messages, newest = [], {}
        per_instance = Counter(ids[k % len(ids)] for k in range(n))
        for instance_id, count in per_instance.items():
            for k in range(count):
                status = random.choice(STATUSES)
                messages.append((instance_id, final - (count - 1 - k) * 1e-3, status))
            newest[instance_id] = status
        random.shuffle(messages)
        started = time.perf_counter()
        for instance_id, sent, status in messages:
            self.publish_heartbeat(instance_id, status, sent)
        self.broker.wait_depth(n)
        pub_rate = n / (time.perf_counter() - started)
        expected = len(newest)
        commits_before = self.commits()

        def done():
            [(applied,)] = self.sql(
                "SELECT count(*) FROM watermarks WHERE kind = 'heartbeat' AND sent >= %s",
                (final - 5e-4,))
            return applied >= expected

        name = f"heartbeats-{_slug(label)}-r{round_no}"
        worker = self.start_worker(self.conductor_app(label), name, self.variants[label])
        try:
            result = self.drain(worker, n, done, name, bool(self.opts.profile))
            time.sleep(0.5)   # let any in-flight (stale) message be acknowledged
        finally:
            self.stop_worker(worker)
        left, _ = self.broker.depth()
        # Our own polls are counted too: subtract them (and the 2 statements of commits()).
        commits = self.commits() - commits_before - result["done_polls"] - 2
        check = self.verify_heartbeats(newest, final)
        problems = _log_problems(worker.log_text())
        rejected = worker.log_text().count("rejected ")
        result.update(publish_rate=pub_rate, left_in_queue=left, log_problems=problems,
                      rejected=rejected, approx_commits=commits,
                      approx_rows_per_commit=n / commits if commits > 0 else float("nan"),
                      mismatches=check["mismatches"],
                      ok=not check["mismatches"] and left == 0 and not rejected and not problems)
        log(f"round {round_no} heartbeats {label}: {result['rate']:8.0f} msg/s "
            f"(steady {result['steady_rate']:.0f}/s, {result['seconds']:.2f}s of which tail {result['tail_seconds']:.2f}s; {_cpu_text(result)}; published at "
            f"{pub_rate:.0f}/s; ~{commits} commits, ~{result['approx_rows_per_commit']:.0f} "
            f"msgs/commit; left {left}; rejected {rejected}; "
            f"correctness {'OK' if not check['mismatches'] else check['mismatches']})")
        return result

    def commits(self) -> int:
        """Transactions committed in the bench database (pg_stat_database; the worker's are
        flushed when it disconnects, ours by pg_stat_force_next_flush)."""
        self.sql("SELECT pg_stat_force_next_flush()")
        time.sleep(0.2)
        [(value,)] = self.sql("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                              (self.database.name,))
        return int(value)

    def verify_heartbeats(self, newest: dict, final: float) -> dict:
        marks = dict(self.sql("SELECT key, sent FROM watermarks WHERE kind = 'heartbeat'"))
        statuses = dict(self.sql("SELECT id, service_status FROM instances WHERE id = ANY(%s)",
                                 (list(newest),)))
        wrong_mark = [i for i in newest if marks.get(i) is None or abs(marks[i] - final) > 1e-6]
        wrong_status = [i for i, s in newest.items() if statuses.get(i) != s]
        mismatches = {}
        if wrong_mark:
            mismatches["watermark"] = len(wrong_mark)
        if wrong_status:
            mismatches["service_status"] = len(wrong_status)
        return {"mismatches": mismatches}

    # ----- latency

    def latency(self, label: str) -> dict:
        """One steady-rate phase; the latency instances are reused by every variant (each
        gets one message per phase, newer than the previous phase's)."""
        opts = self.opts
        self.sql(f"""
            CREATE OR REPLACE FUNCTION bench_notify_commit() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('{NOTIFY_CHANNEL}', (txid_current() % 4294967296)::text);
                RETURN NULL;
            END $$""")
        self.sql("CREATE OR REPLACE TRIGGER bench_notify_commit AFTER INSERT ON watermarks "
                 "FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_commit()")
        name = f"latency-{_slug(label)}"
        worker = self.start_worker(self.conductor_app(label), name, self.variants[label])
        listener = Listener(self.dsn, self.work_dir / f"commits-{_slug(label)}.txt", worker.pid)
        profiler = None
        try:
            self.wait_consuming(worker, 0)
            self.helpers.append(listener)
            listener.start()
            # Warm-up: one second at the same rate on the drain instances (not measured),
            # until the conductor has applied all of it.
            warm_sent = time.time()
            warm = [self.drain_ids[k % len(self.drain_ids)] for k in range(min(opts.rate, len(self.drain_ids)))]
            self._paced(warm, opts.rate, lambda i: warm_sent + i * 1e-6)
            self._wait_applied(lambda: self.sql(
                "SELECT count(*) FROM watermarks WHERE kind = 'heartbeat' AND sent >= %s",
                (warm_sent - 5e-4,))[0][0] >= len(set(warm)), worker, "warm-up heartbeats")
            if opts.profile:
                profiler = Profiler(worker.pid, Path(opts.profile) / f"{name}.txt", False)
                self.helpers.append(profiler)
            lat_start = time.time()
            cpu = CpuWindow(self, worker.pid, [listener.process.pid]).start()
            lags, first, last = self._paced(self.latency_ids, opts.rate, None)
            publish_seconds = last - first
            achieved = (len(self.latency_ids) - 1) / publish_seconds if publish_seconds > 0 else float("nan")
            self._wait_applied(lambda: self.sql(
                "SELECT count(*) FROM watermarks WHERE kind = 'heartbeat' AND sent >= %s",
                (lat_start,))[0][0] >= len(self.latency_ids), worker, "every steady-rate heartbeat")
            usage = cpu.stop()
        finally:
            if profiler:
                profiler.stop()
                self.helpers.remove(profiler)
            if listener in self.helpers:
                listener.stop()
                self.helpers.remove(listener)
            self.stop_worker(worker)
        commit_times, samples = listener.read()
        rows = self.sql(
            "SELECT w.key, w.sent, (w.xmin::text)::bigint, i.last_heartbeat FROM watermarks w "
            "JOIN instances i ON i.id = w.key WHERE w.kind = 'heartbeat' AND w.key = ANY(%s)",
            (self.latency_ids,))
        commit_ms, apply_ms, missing, by_second = [], [], 0, {}
        for _key, sent, xid, last_heartbeat in rows:
            if xid in commit_times:
                latency_ms = (commit_times[xid] - sent) * 1000
                commit_ms.append(latency_ms)
                by_second.setdefault(int(sent - lat_start), []).append(latency_ms)
            else:
                missing += 1
            if last_heartbeat is not None:
                apply_ms.append((last_heartbeat.replace(tzinfo=timezone.utc).timestamp() - sent) * 1000)
        commit_ms.sort()
        apply_ms.sort()
        # Per transaction (= batch): its size, and batch start -> commit (the conductor's
        # clock at the start of the batch, ``last_heartbeat``, to the NOTIFY at commit).
        batches: dict[int, list] = {}
        for _key, _sent, xid, last_heartbeat in rows:
            batches.setdefault(xid, [last_heartbeat, 0])[1] += 1
        service_ms = sorted(
            (commit_times[xid] - start.replace(tzinfo=timezone.utc).timestamp()) * 1000
            for xid, (start, _size) in batches.items() if xid in commit_times and start)
        batch_sizes = sorted(size for _start, size in batches.values())
        per_second = {}
        for second, values in sorted(by_second.items()):
            values.sort()
            cpu_samples = [sample[1:] for sample in samples
                           if second <= sample[0] - lat_start < second + 1]
            lag_max = max((lag for sent, lag in lags if int(sent - lat_start) == second), default=0.0)
            per_second[second] = {
                "n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
                "max": values[-1], "publisher_lag_max_ms": lag_max * 1000,
                "cores": {key: _mean([sample[k] for sample in cpu_samples])
                          for k, key in enumerate(SAMPLE_KEYS)},
                "runnable": _mean([sample[-1] for sample in cpu_samples]),
            }
        lags = sorted(lag for _sent, lag in lags)
        problems = _log_problems(worker.log_text())
        result = {
            "published": len(self.latency_ids), "target_rate": opts.rate,
            "achieved_rate": achieved, "publish_seconds": publish_seconds,
            "publisher_lag_ms": {"p50": percentile(lags, 50) * 1000, "p99": percentile(lags, 99) * 1000,
                                 "max": lags[-1] * 1000 if lags else float("nan")},
            "applied": len(rows), "missing_commit_times": missing,
            "commit_ms": _stats(commit_ms), "batch_start_ms": _stats(apply_ms),
            "batch_service_ms": _stats(service_ms), "batch_size": _stats(batch_sizes),
            "log_problems": problems, "profiled": bool(opts.profile),
            "transactions": len(set(x for _k, _s, x, _l in rows)),
            "per_second": per_second, "cpu": usage,
            "worker_cpu_us_per_msg": usage["worker_cpu_s"] / len(self.latency_ids) * 1e6,
            "pg_cpu_us_per_msg": usage["pg_backend_cpu_s"] / len(self.latency_ids) * 1e6,
        }
        if profiler:
            result["profile"] = str(profiler.out)
        c = result["commit_ms"]
        log(f"latency {label}: published {result['published']} at {achieved:.0f}/s (target {opts.rate}/s; "
            f"publisher lag p99 {result['publisher_lag_ms']['p99']:.2f} ms); "
            f"{result['applied']} applied in {result['transactions']} transactions; "
            f"send->commit p50 {c['p50']:.1f} p90 {c['p90']:.1f} p99 {c['p99']:.1f} "
            f"max {c['max']:.1f} ms; missing commit times {missing}")
        return result

    def _paced(self, ids: list, rate: float, sent_for):
        """Publish one heartbeat per id on the schedule start + i/rate (absolute, so a late
        message does not shift the ones after it). Returns ([(sent, lag)], first, last)."""
        lags = []
        start = time.monotonic() + 0.05
        first = last = start
        for i, instance_id in enumerate(ids):
            target = start + i / rate
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            if i == 0:
                first = now
            sent = time.time() if sent_for is None else sent_for(i)
            lags.append((sent, max(0.0, now - target)))
            self.publish_heartbeat(instance_id, "running", sent)
            last = now
        return lags, first, last

    def _wait_applied(self, predicate, worker: WorkerProcess, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            worker.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{worker.log_tail()}")
            time.sleep(0.05)

    # ----- raw broker floor

    def raw_floor(self, prefetch: int) -> dict:
        from kombu import Connection, Consumer

        n = min(self.opts.messages, self.opts.raw_messages)
        self.publish_noops(n, queue=RAW_QUEUE)
        got = [0]
        with Connection(self.vhost.url) as conn:
            channel = conn.channel()

            def on_message(message):
                message.ack()
                got[0] += 1

            consumer = Consumer(channel, queues=[self.broker.queues[RAW_QUEUE]],
                                on_message=on_message, prefetch_count=prefetch, no_ack=False)
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
            channel.close()
        rate = n / elapsed
        log(f"raw broker floor (kombu consumer, acks only, prefetch {prefetch}): {rate:.0f} msg/s")
        return {"prefetch": prefetch, "rate": rate, "seconds": elapsed}

    # ----- orchestration

    def run(self) -> dict:
        opts = self.opts
        self.setup()
        self.create_instances()
        if not opts.no_raw:
            self.results["raw"] = [self.raw_floor(p) for p in (8, 208)]
        labels = list(self.variants)
        for round_no in range(1, opts.rounds + 1):
            # ABBA: floor first in odd rounds, last in even ones (variants reversed too).
            order = ["floor", *labels] if round_no % 2 else [*reversed(labels), "floor"]
            entry = {"heartbeats": {}}
            for kind in order:
                if kind == "floor":
                    entry["floor"] = self.floor_round(round_no)
                else:
                    entry["heartbeats"][kind] = self.heartbeat_round(round_no, kind)
            self.results["rounds"].append(entry)
        if opts.seconds > 0 and opts.rate > 0:
            self.results["latency"] = {label: self.latency(label) for label in labels}
        return self.results


class Listener:
    """A separate process LISTENing for the commit notifications (no GIL shared with the
    publisher); writes '<xid> <time.time()>' per notification."""

    def __init__(self, dsn: dict, out: Path, worker_pid: int):
        self.dsn, self.out, self.worker_pid = dsn, out, worker_pid
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--_listen", json.dumps(self.dsn),
             str(self.out), str(self.worker_pid)], stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL, start_new_session=True)
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        if not ready or not self.process.stdout.readline().startswith(b"listening"):
            raise RuntimeError("commit listener did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process and self.process.stdout:
            self.process.stdout.close()

    def read(self) -> tuple[dict[int, float], list]:
        """({xid: commit time}, [(time, *SAMPLE_KEYS cores, runnable threads)])"""
        times, samples = {}, []
        for line in self.out.read_text().splitlines():
            parts = line.split()
            if parts[0] == "S":
                samples.append(tuple(float(v) for v in parts[1:]))
            else:
                times.setdefault(int(parts[0]), float(parts[1]))
        return times, samples


def listen_main(dsn_json: str, out: str, worker_pid: str) -> None:
    """Commit times (NOTIFY arrives at commit) and, every 0.5 s, a CPU sample: machine
    busy cores, the worker tree's cores, runnable threads (procs_running)."""
    import psycopg2

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    conn = psycopg2.connect(**json.loads(dsn_json))
    conn.autocommit = True
    conn.cursor().execute(f"LISTEN {NOTIFY_CHANNEL}")
    breakdown = CpuBreakdown(int(worker_pid), [os.getppid(), os.getpid()])
    last = time.time()
    with open(out, "w") as sink:
        print("listening", flush=True)
        while not stop:
            if select.select([conn], [], [], 0.1)[0]:
                conn.poll()
                now = time.time()
                while conn.notifies:
                    sink.write(f"{conn.notifies.pop(0).payload} {now!r}\n")
            now = time.time()
            if now - last >= 0.5:
                cores = breakdown.delta()
                with open("/proc/stat") as stat:
                    running = next(int(line.split()[1]) for line in stat
                                   if line.startswith("procs_running"))
                sink.write(f"S {now!r} " + " ".join(f"{cores[k]:.3f}" for k in SAMPLE_KEYS)
                           + f" {running}\n")
                last = now
    conn.close()


def _cpu_text(result: dict) -> str:
    cpu = result["cpu"]
    return (f"worker {result['worker_cpu_us_per_msg']:.0f} us CPU/msg + PostgreSQL backend "
            f"{result['pg_cpu_us_per_msg']:.0f} us/msg; {_breakdown_text(cpu['breakdown_cores'])}")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", label.replace("size=", "s").replace(" interval=", "-i"))


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def _stats(values: list) -> dict:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": values[-1] if values else float("nan"),
            "min": values[0] if values else float("nan")}


def _log_problems(text: str) -> list:
    problems = []
    for marker in ("Traceback", "ERROR", "CRITICAL", "unregistered task", "database unavailable"):
        count = text.count(marker)
        if count:
            problems.append(f"{count}x {marker}")
    return problems


def print_summary(results: dict, opts) -> None:
    rounds = results["rounds"]
    labels = list(rounds[0]["heartbeats"]) if rounds else list(results.get("latency") or {})
    floor = [r["floor"]["rate"] for r in rounds]
    floor_steady = [r["floor"]["steady_rate"] for r in rounds]
    floor_cpu = [r["floor"]["worker_cpu_us_per_msg"] for r in rounds]
    profiled = " (PROFILED with py-spy: rates are lowered)" if opts.profile else ""
    fmt = lambda xs, f="{:.0f}": ", ".join(f.format(x) for x in xs)  # noqa: E731
    print()
    print("=" * 100)
    print(f"conductor heartbeat benchmark: {opts.instances} instances, {opts.messages} messages per "
          f"drain, {opts.rounds} rounds (ABBA){profiled}; worker -c "
          f"{opts.concurrency or 'default (CPU count)'}; {CPUS} CPUs; conductor -A {opts.conductor_app}"
          + ("  ** EXPERIMENT, NOT THE PRODUCT **" if opts.conductor_app != "dbaas" else ""))
    print("-" * 100)
    if results.get("raw"):
        print("raw broker floor (kombu, acks only) : " + "; ".join(
            f"{r['rate']:.0f} msg/s (prefetch {r['prefetch']})" for r in results["raw"]))
    if rounds:
        print(f"floor (no-op task)                  : {median(floor):7.0f} msg/s   rounds [{fmt(floor)}]; "
              f"steady [{fmt(floor_steady)}]; worker CPU [{fmt(floor_cpu)}] us/msg")
    ok = all(r["floor"]["ok"] for r in rounds)
    problems = [p for r in rounds for p in r["floor"]["log_problems"]]
    mismatches = []
    for label in labels if rounds else []:
        runs = [r["heartbeats"][label] for r in rounds]
        rates = [x["rate"] for x in runs]
        ratios = [x["rate"] / r["floor"]["rate"] for x, r in zip(runs, rounds)]
        steady_ratios = [x["steady_rate"] / r["floor"]["steady_rate"] for x, r in zip(runs, rounds)]
        cpu_ratios = [r["floor"]["worker_cpu_us_per_msg"] / x["worker_cpu_us_per_msg"]
                      for x, r in zip(runs, rounds)]
        verdict = "MET" if median(ratios) >= 2.0 else "NOT MET"
        print(f"heartbeats {label:25s}: {median(rates):7.0f} msg/s   rounds [{fmt(rates)}]   "
              f"ratio heartbeats/floor {median(ratios):.2f} [{fmt(ratios, '{:.2f}')}] "
              f"(target >= 2.0: {verdict})")
        print(f"  {'':34s}  steady [{fmt([x['steady_rate'] for x in runs])}] msg/s, ratio "
              f"[{fmt(steady_ratios, '{:.2f}')}]; tail [{fmt([x['tail_seconds'] for x in runs], '{:.2f}')}] s; worker CPU [{fmt([x['worker_cpu_us_per_msg'] for x in runs])}]"
              f" us/msg + its PostgreSQL backend [{fmt([x['pg_cpu_us_per_msg'] for x in runs])}] us/msg; "
              f"CPU ratio floor/heartbeats [{fmt(cpu_ratios, '{:.2f}')}]; ~msgs/commit "
              f"[{fmt([x['approx_rows_per_commit'] for x in runs], '{:.0f}')}]")
        ok = ok and all(x["ok"] for x in runs)
        problems += [p for x in runs for p in x["log_problems"]]
        mismatches += [x["mismatches"] for x in runs if x["mismatches"]]
    for r_no, r in enumerate(rounds, 1):
        print(f"  CPU round {r_no} floor drain       : {_breakdown_text(r['floor']['cpu']['breakdown_cores'])}")
        for label in labels:
            print(f"  CPU round {r_no} heartbeats drain  : "
                  f"{_breakdown_text(r['heartbeats'][label]['cpu']['breakdown_cores'])} ({label})")
    for label, lat in (results.get("latency") or {}).items():
        c, b = lat["commit_ms"], lat["batch_start_ms"]
        verdict = "MET" if c["p99"] < 100 else "NOT MET"
        print(f"latency {label} @ {opts.rate}/s x {opts.seconds}s: send->commit p50 {c['p50']:.1f} ms, "
              f"p90 {c['p90']:.1f} ms, p99 {c['p99']:.1f} ms, max {c['max']:.1f} ms "
              f"(target p99 < 100 ms: {verdict})")
        print(f"  publish                 : achieved {lat['achieved_rate']:.0f}/s, lag behind schedule "
              f"p99 {lat['publisher_lag_ms']['p99']:.2f} ms, max {lat['publisher_lag_ms']['max']:.1f} ms")
        print(f"  send->batch start       : p50 {b['p50']:.1f} ms, p99 {b['p99']:.1f} ms "
              f"(instances.last_heartbeat); {lat['applied']}/{lat['published']} applied in "
              f"{lat['transactions']} transactions, {lat['missing_commit_times']} without commit time")
        sv, bs = lat["batch_service_ms"], lat["batch_size"]
        print(f"  per batch               : batch start->commit p50 {sv['p50']:.1f} ms, p99 {sv['p99']:.1f} ms, "
              f"max {sv['max']:.1f} ms; messages per batch p50 {bs['p50']:.0f}, p99 {bs['p99']:.0f}, "
              f"max {bs['max']:.0f}")
        print(f"  CPU during the phase    : worker {lat['worker_cpu_us_per_msg']:.0f} us/msg, "
              f"its PostgreSQL backend {lat['pg_cpu_us_per_msg']:.0f} us/msg; "
              f"{_breakdown_text(lat['cpu']['breakdown_cores'])}")
        print("  per second of sending   : send->commit ms p50/p99/max | publisher lag max ms | "
              "cores: machine worker rabbitmq postgres bench other | runnable threads")
        for second, row in lat["per_second"].items():
            cores = " ".join(f"{row['cores'][k]:4.2f}" for k in SAMPLE_KEYS)
            print(f"    {second:3d}s: {row['p50']:6.1f} {row['p99']:6.1f} {row['max']:6.1f} | "
                  f"{row['publisher_lag_max_ms']:6.1f} | {cores} | {row['runnable']:.1f}")
        problems += lat["log_problems"]
        ok = ok and lat["applied"] == lat["published"] and not lat["missing_commit_times"]
    print(f"correctness                         : {'OK' if ok and not problems else 'FAILED'}"
          f"{' mismatches ' + str(mismatches) if mismatches else ''}"
          f"{' log: ' + str(problems) if problems else ''}")
    print("=" * 100)
    if opts.profile:
        profiles = [r["floor"].get("profile") for r in rounds]
        profiles += [r["heartbeats"][label].get("profile") for r in rounds for label in labels]
        profiles += [lat.get("profile") for lat in (results.get("latency") or {}).values()]
        for path in filter(None, profiles):
            print(f"\nprofile {path}:")
            print(summarize_profile(Path(path)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000, help="instances of the drains (M)")
    parser.add_argument("--messages", type=int, default=20000, help="messages per drain (N)")
    parser.add_argument("--rate", type=int, default=1000, help="steady publish rate, msg/s (R)")
    parser.add_argument("--seconds", type=int, default=15, help="steady-rate duration (S); 0 skips")
    parser.add_argument("--rounds", type=int, default=2, help="floor/heartbeat rounds (ABBA order)")
    parser.add_argument("--batch-size", type=int, help="DBAAS_HEARTBEAT_BATCH_SIZE for the workers")
    parser.add_argument("--batch-interval", type=float,
                        help="DBAAS_HEARTBEAT_BATCH_INTERVAL (seconds) for the workers")
    parser.add_argument("--variants", metavar="SIZE:INTERVAL[:APP],...",
                        help="measure several batch settings (and conductor apps) in the same run, "
                             "interleaved, e.g. 'default,50:0.005,500:0.05' (empty "
                             "SIZE, INTERVAL or APP keeps the default)")
    parser.add_argument("--conductor-app", default="dbaas", metavar="MODULE",
                        help="celery -A MODULE for the heartbeat workers (default: dbaas, the "
                             "product)")
    parser.add_argument("--concurrency", type=int, help="worker -c (default: the product's, CPU count)")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw kombu broker floor")
    parser.add_argument("--raw-messages", type=int, default=5000,
                        help="messages per raw broker floor measurement")
    parser.add_argument("--profile", metavar="DIR", help="py-spy record the workers into DIR")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep database, vhost and logs")
    parser.add_argument("--seed", type=int, default=None)
    opts = parser.parse_args(argv)
    if opts.variants:
        opts.variants = [_variant(text) for text in opts.variants.split(",")]
    else:
        opts.variants = [(opts.batch_size, opts.batch_interval, None)]
    return opts


def _variant(text: str) -> tuple:
    text = text.strip()
    if text in ("", "default"):
        return (None, None, None)
    size, _, rest = text.partition(":")
    interval, _, app = rest.partition(":")
    return (int(size) if size.strip() else None, float(interval) if interval.strip() else None,
            app.strip() or None)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_listen":
        listen_main(sys.argv[2], sys.argv[3], sys.argv[4])
        return 0
    opts = parse_args(argv)
    if opts.seed is not None:
        random.seed(opts.seed)
    if opts.profile:
        Path(opts.profile).mkdir(parents=True, exist_ok=True)
    # Make SIGTERM unwind through the finally blocks below, like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(opts)
    started = time.monotonic()
    try:
        results = bench.run()
    except BaseException:
        bench.failed = True
        raise
    finally:
        bench.teardown()
    results["total_seconds"] = time.monotonic() - started
    print_summary(results, opts)
    print(f"total {results['total_seconds']:.0f}s")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
