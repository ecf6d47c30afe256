"""The processes the bench runs: conductors (the product's worker command) and py-spy."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.hb.cpu import memory_kb, tree_rss_kb

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "trove-conductor"
REFUSED = b"on the guests' queue"   # consumer.Batcher.refuse: "refused %s on the guests' queue: %s"


class Conductor:
    """``python -m celery -A dbaas worker -Q trove-conductor -n NAME@%h``: the product's
    conductor command (default concurrency and log level); ``-n`` only gives each of
    several conductors on this host a name of its own."""

    def __init__(self, env: dict, log_path: Path, name: str):
        self.args = [sys.executable, "-m", "celery", "-A", "dbaas", "worker", "-Q", QUEUE,
                     "-n", f"{name}@%h"]
        self.env, self.log_path, self.name = env, log_path, name
        self.process: subprocess.Popen | None = None
        self._log = None
        self._offset, self._refused = 0, 0
        self.started_at = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> "Conductor":
        self._log = open(self.log_path, "ab")
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"conductor {self.name} exited ({self.process.returncode}):\n{self.log_tail()}")

    def signal_group(self, signum) -> None:
        """To our own process group only (main process and its pool children)."""
        if self.alive():
            os.killpg(self.process.pid, signum)

    def freeze(self) -> None:
        self.signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal_group(signal.SIGCONT)

    def refused(self) -> int:
        """Refusal log lines so far (read incrementally)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._offset)
                chunk = log.read()
        except OSError:
            return self._refused
        cut = chunk.rfind(b"\n") + 1
        self._refused += chunk[:cut].count(REFUSED)
        self._offset += cut
        return self._refused

    def memory(self) -> dict:
        found = memory_kb(self.pid)
        return {"rss_kb": found.get("VmRSS", 0), "peak_rss_kb": found.get("VmHWM", 0),
                "tree_rss_kb": tree_rss_kb(self.pid)}

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
                    os.killpg(self.process.pid, signal.SIGCONT)
                    os.killpg(self.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(self.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.process.wait(timeout=30)
            else:
                try:  # the main process is gone: no pool child of ours may linger
                    os.killpg(self.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        finally:
            if self._log:
                self._log.close()
                self._log = None


def log_problems(text: str) -> list[str]:
    problems = []
    for marker in ("Traceback", "ERROR", "CRITICAL", "Unrecoverable", "refused ",
                   "database unavailable"):
        count = text.count(marker)
        if count:
            problems.append(f"{count}x {marker.strip()}")
    return problems


class Profiler:
    """``py-spy record --gil`` on one process (the conductor's main process: the guests'
    consumer runs there), stopped with SIGINT, which makes it write its file. With
    ``--gil`` only samples where the thread holds the GIL count: its Python CPU, without
    the time it waits in C with the GIL released (psycopg2 waiting for PostgreSQL, socket
    reads)."""

    RATE = 250

    def __init__(self, pid: int, out: Path):
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent) + os.pathsep
                           + os.environ.get("PATH", ""))
        if exe is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy (in the venv)")
        self.out = out
        self._stderr = open(str(out) + ".log", "wb")
        self.process = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(self.RATE), "--format", "raw",
             "--output", str(out), "--nonblocking", "--gil"],
            stdout=self._stderr, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        time.sleep(0.3)  # attached before the work starts

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


AREAS = [  # (marker in a frame, area): the leaf's library, first match wins
    ("(psycopg2/", "psycopg2 (incl. waits on PostgreSQL)"),
    ("(sqlalchemy/", "SQLAlchemy"),
    ("(amqp/", "py-amqp (AMQP framing, socket I/O)"),
    ("(kombu/", "kombu"),
    ("(billiard/", "billiard"),
    ("(celery/", "Celery"),
    ("(vine/", "vine"),
    ("(workers/", "workers/ (conductor code)"),
    ("(dbaas/", "dbaas/"),
    ("(json/", "json"),
    ("(hmac.py", "hmac"),
    ("(logging/", "logging"),
    ("(uuid.py", "uuid"),
]
# Entry points worth an inclusive figure (matched with or without a class prefix).
INCLUSIVE = ("on_message (workers/conductor/consumer.py)", "flush (workers/conductor/consumer.py)",
             "check_task_message (dbaas/intake.py)", "decode_json (dbaas/intake.py)",
             "check_headers (dbaas/intake.py)", "check_body (dbaas/intake.py)", "within_depth (dbaas/intake.py)",
             "verify_sender (dbaas/intake.py)", "verify_claim (dbaas/signing.py)",
             "guest_secret (dbaas/signing.py)", "mac (dbaas/signing.py)", "canonical (dbaas/signing.py)",
             "loads (json/__init__.py)", "run_transaction (dbaas/db.py)",
             "apply_batch (workers/conductor/consumer.py)",
             "refuse_revoked (workers/conductor/auth.py)", "handle (workers/conductor/heartbeats.py)",
             "parse_heartbeat (workers/conductor/messages.py)", "advance (workers/conductor/ordering.py)",
             "_apply_newest (workers/conductor/heartbeats.py)", "commit (sqlalchemy/orm/session.py)",
             "execute (sqlalchemy/orm/session.py)", "do_execute (sqlalchemy/engine/default.py)",
             "_settle (workers/conductor/consumer.py)", "refuse (workers/conductor/consumer.py)",
             "_receive_callback (kombu/messaging.py)", "Message.__init__ (kombu/transport/pyamqp.py)",
             "_on_basic_deliver (amqp/channel.py)", "on_frame (amqp/method_framing.py)",
             "_read (amqp/transport.py)", "read_frame (amqp/transport.py)", "having_timeout (amqp/transport.py)",
             "uuid4 (uuid.py)")
# Where a sample's time goes, by the first of these found in its stack (innermost first).
STAGES = [
    ("refuse (workers/conductor/consumer.py)", "refusing (log line + basic.reject)"),
    ("do_execute (sqlalchemy/engine/default.py)", "batch: psycopg2 executing SQL"),
    ("commit (sqlalchemy/orm/session.py)", "batch: commit"),
    ("run_transaction (dbaas/db.py)", "batch: SQLAlchemy + conductor code around the SQL"),
    ("_settle (workers/conductor/consumer.py)", "acknowledging (basic.ack multiple)"),
    ("within_depth (dbaas/intake.py)", "intake: nesting-depth walks"),
    ("verify_sender (dbaas/intake.py)", "intake: signature (canonical JSON + 2 HMACs)"),
    ("decode_json (dbaas/intake.py)", "intake: JSON decoding"),
    ("check_task_message (dbaas/intake.py)", "intake: other checks (headers, body shape)"),
    ("on_message (workers/conductor/consumer.py)", "consumer: batching bookkeeping, timers"),
    ("_receive_callback (kombu/messaging.py)", "receiving: kombu message objects"),
    ("drain_events (amqp/connection.py)", "receiving: py-amqp frames, socket reads, header tables"),
]


def _matches(frame: str, entry: str) -> bool:
    return frame == entry or frame.endswith("." + entry)


def _strip_line(frame: str) -> str:
    """'func (path/pkg/mod.py:123)' -> 'func (pkg/mod.py)' (site-packages and repo prefixes cut)."""
    head, sep, tail = frame.rpartition(":")
    if sep and tail.rstrip(")").isdigit():
        frame = head + ")"
    name, _, path = frame.partition(" (")
    for cut in ("site-packages/", str(ROOT) + "/", "/lib/python3.11/"):
        if cut in path:
            path = path.split(cut, 1)[1]
    return f"{name} ({path}" if path else name


def _area(frames: list) -> str:
    for marker, name in AREAS:
        if marker in frames[-1]:
            return name
    for frame in reversed(frames):  # a standard-library leaf: the nearest library above it
        for marker, name in AREAS:
            if marker in frame:
                return f"{name} -> stdlib"
    return "other (interpreter, idle loop)"


def summarize_profile(path: Path, top: int = 15) -> str:
    """Where the samples of a py-spy raw (collapsed) file fall."""
    if not path.exists():
        return f"  (no profile written: see {path}.log)"
    leaf, inclusive, area, stage = Counter(), Counter(), Counter(), Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = [_strip_line(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf[frames[-1]] += count
        area[_area(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
        stage[next((name for entry, name in STAGES if any(_matches(f, entry) for f in frames)),
                   "other (Celery's loop, timers, control queue)")] += count
    if not total:
        return "  (no samples)"
    out = [f"  {total} samples (~{total / Profiler.RATE:.1f} s at {Profiler.RATE} Hz, holding the GIL: "
           f"waits with the GIL released, e.g. psycopg2 waiting for PostgreSQL, are left out)",
           "  by stage of the guest path:"]
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in stage.most_common()]
    out.append("  by library of the leaf frame:")
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in area.most_common(10)]
    out.append("  top functions, self time:")
    out += [f"    {100 * n / total:5.1f}%  {name[:140]}" for name, n in leaf.most_common(top)]
    out.append("  guest path, inclusive time:")
    picked = {}
    for name, n in inclusive.items():
        entry = next((e for e in INCLUSIVE if _matches(name, e)), None)
        if entry:
            picked[name] = max(picked.get(name, 0), n)
    out += [f"    {100 * n / total:5.1f}%  {name[:140]}" for name, n in sorted(picked.items(), key=lambda x: -x[1])]
    return "\n".join(out)
