"""An attacker's side of a test: hostile messages published to a real broker (through
kombu, through raw AMQP frames, or as files in the embedded broker's directory), and the
checks a defender's worker must pass after each class of them.

A ``Runner`` sends the cases of one class one at a time to a real worker process and
waits, after each, for its refusal line (or for the worker's death: the case that killed
it is named, the poison message purged and the worker started again, so the rest of the
class is still tried). After the class: the worker is alive, the database is as it was,
every queue of the broker is empty (nothing redelivered forever, nothing published
elsewhere; on RabbitMQ the vhost's firehose also shows that nobody but the test
published), and a valid message sent afterwards is still served.
"""

import base64
import contextlib
import json
import os
import re
import struct
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

import amqp
import pytest
from amqp.serialization import _write_item
from kombu import Connection, Exchange, Producer, Queue
from sqlalchemy import select

import dbaas.broker  # noqa: F401  registers the embedded broker's URL scheme
from dbaas import db, migrations, signing
from dbaas.files import write_atomically
from dbaas.models import Watermark
from tests.support.services import (AMQP_ADMIN_URL, AMQP_HOST, PostgresDatabase, RabbitVhost,
                                    check_port, project_env, unavailable, wait_until)
from tests.support.stack import SERVICE_KEY, Stack, configure, snapshot
from workers.guestagent.client import build_message

GUESTS_QUEUE = "trove-conductor"
CONTROL_QUEUE = "trove-conductor-control"
TASKMANAGER_QUEUE = "trove-taskmanager"
GUEST_EXCHANGE = "guestagent"
# Queues no product code uses: callbacks and reply addresses in hostile messages point
# here, so that anything a worker published because a message asked it to is seen.
SINK_QUEUE = "redteam-sink"
REPLY_QUEUE = "redteam-reply"
SPY_QUEUE = "redteam-firehose"

# One refusal, as dbaas.worker (control and taskmanager queues) and the guests' queue
# consumer log it: "refused [message ]TASK[ID] on WHERE: REASON".
REFUSAL = re.compile(r"(?:refused (?:message )?.+? on (?:the guests' queue|[\w.-]+): |"
                     r"(?=Can't decode message body))(?P<reason>.*)$", re.M)  # the latter: Celery's own
SET_ASIDE = re.compile(r"undecodable message (?P<name>\S+) moved to", re.M)


class Unpublishable(Exception):
    """The client library or the broker would not take the message at all."""


# --- a stack for a whole module (the conftest's ``stack`` is per test)


@contextlib.contextmanager
def module_stack(kind: str, tmp_path: Path):
    """The conftest's ``stack`` fixture, for a module: one worker serves many tests."""
    patch = pytest.MonkeyPatch()
    postgres = vhost = None
    try:
        if kind == "embedded":
            database_url = f"sqlite:///{tmp_path / 'control.sqlite3'}"
            broker_url = dbaas.broker.broker_url_for(str(tmp_path / "broker"))
        else:
            check_port(AMQP_HOST, "RabbitMQ")
            postgres = PostgresDatabase()
            try:
                postgres.create()
            except Exception as exc:  # any connection failure
                postgres = None
                unavailable("PostgreSQL", exc)
            vhost = RabbitVhost().create()
            database_url, broker_url = postgres.url, vhost.url
        extra = {} if kind == "embedded" else {"DBAAS_BROKER_ADMIN_URL": AMQP_ADMIN_URL}
        env = project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=database_url,
                          DBAAS_BROKER_URL=broker_url, DBAAS_SERVICE_KEY=SERVICE_KEY, **extra)
        configure(patch, **{k: v for k, v in env.items() if k.startswith("DBAAS_")})
        migrations.upgrade()
        yield Stack(kind, database_url, broker_url, env, tmp_path, postgres)
    finally:
        if db._engine is not None:
            db._engine.dispose()
        patch.undo()
        if vhost is not None:
            vhost.drop()
        if postgres is not None:
            postgres.drop()


# --- the broker as the attacker and the auditor see it


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


class CraftedMessage(amqp.Message):
    """A py-amqp message whose content-header properties are the given bytes, whatever
    they hold: what a hostile client can put on the wire (kombu would not)."""

    def __init__(self, body: bytes, raw_properties: bytes, **properties):
        super().__init__(body, **properties)
        self.raw_properties = raw_properties

    def _serialize_properties(self):
        return self.raw_properties


def amqp_table(entries) -> bytes:
    """An AMQP field table from ``(key, value)`` pairs; a key may be bytes (not UTF-8)
    and a value may be ``Raw(bytes)``: an already encoded field value."""
    out = bytearray()
    for key, value in entries:
        key = key.encode() if isinstance(key, str) else key
        out += struct.pack("B", len(key)) + key
        if isinstance(value, Raw):
            out += value.data
        else:
            chunks = []
            _write_item(value, chunks.append, [])
            out += b"".join(chunks)
    return struct.pack(">I", len(out)) + bytes(out)


@dataclass
class Raw:
    data: bytes


def deep_table_value(depth: int, kind: str = "F") -> Raw:
    """A field value nested ``depth`` tables (``F``) or arrays (``A``) deep, built
    without recursion."""
    inner = struct.pack(">I", 0)
    for _ in range(depth):
        entry = (b"\x01aF" if kind == "F" else b"F") + inner
        inner = struct.pack(">I", len(entry)) + entry
    return Raw(kind.encode() + inner)


def shortstr(value) -> bytes:
    value = value.encode() if isinstance(value, str) else value
    return struct.pack("B", len(value)) + value


def basic_properties(content_type=b"application/json", content_encoding=b"utf-8",
                     headers: bytes | None = None, reply_to=None, correlation_id=None,
                     delivery_mode: int | None = 2) -> bytes:
    """Basic content-header properties, each given as bytes exactly as it goes on the wire."""
    flags, out = 0, b""
    if content_type is not None:
        flags |= 0x8000
        out += shortstr(content_type)
    if content_encoding is not None:
        flags |= 0x4000
        out += shortstr(content_encoding)
    if headers is not None:
        flags |= 0x2000
        out += headers
    if delivery_mode is not None:
        flags |= 0x1000
        out += struct.pack("B", delivery_mode)
    if correlation_id is not None:
        flags |= 0x0400
        out += shortstr(correlation_id)
    if reply_to is not None:
        flags |= 0x0200
        out += shortstr(reply_to)
    return struct.pack(">H", flags) + out


class Broker:
    """Publishing anything anywhere, and seeing what every queue holds."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.kind = stack.kind
        self.connection = Connection(stack.broker_url, transport_options={"confirm_publish": False})
        self.channel = self.connection.channel()
        self.producer = Producer(self.channel)
        self.published: Counter = Counter()  # (exchange, routing key) -> messages the test sent
        self._raw = None
        if self.kind == "embedded":
            self.root = Path(unquote(urlsplit(stack.broker_url).path))
        else:
            self.vhost = unquote(urlsplit(stack.broker_url).path[1:])

    # ... queues

    def declare(self, *queues: Queue) -> None:
        for declared in queues:
            declared(self.channel).declare()

    def depths(self) -> dict[str, int]:
        """Messages (ready and unacknowledged) per queue, of every queue the broker has."""
        if self.kind == "embedded":
            found: Counter = Counter()
            for queue in os.listdir(self.root / "messages"):  # a directory per queue
                for name in os.listdir(self.root / "messages" / queue):
                    if name.endswith(".msg") and not name.startswith("."):
                        found[queue] += 1
            for name in os.listdir(self.root / "unacked"):
                found[name.split(".", 2)[2][:-len(".msg")] + " (unacked)"] += 1
            return dict(found)
        depths = {}
        for line in _rabbitmqctl("list_queues", "-p", self.vhost, "name", "messages").splitlines():
            name, _, count = line.rpartition("\t")
            if name and count.isdigit() and name != SPY_QUEUE:
                depths[name] = int(count)
        return depths

    def nonempty(self) -> dict[str, int]:
        return {name: count for name, count in self.depths().items() if count}

    def purge(self, *names: str) -> None:
        """Drop every message of these queues, the unacknowledged ones of dead consumers
        included (a poison message must not kill the worker started after it)."""
        if self.kind == "embedded":
            folders = [self.root / "unacked", *(self.root / "messages" / queue for queue in names)]
            for folder in folders:
                for name in os.listdir(folder) if folder.is_dir() else ():
                    if any(name.endswith(f".{queue}.msg") for queue in names):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(folder / name)
            return
        for name in names:
            with contextlib.suppress(Exception):
                self.channel.queue_purge(name)

    # ... publishing

    def publish(self, exchange: str, routing_key: str, body, sync: bool = True, **properties) -> None:
        """Through kombu, as any client would; Unpublishable when kombu refuses, or when
        RabbitMQ closes the connection over it (``sync``: a round trip after the publish
        tells)."""
        try:
            self.producer.publish(body, exchange=exchange, routing_key=routing_key, **properties)
        except (RecursionError, TypeError, ValueError, OverflowError, struct.error) as exc:
            raise Unpublishable(f"kombu: {type(exc).__name__}: {str(exc)[:120]}") from None
        if sync and self.kind == "rabbitmq-postgresql":
            try:
                self.channel.exchange_declare(exchange=exchange, type="direct", passive=True)
            except Exception as exc:  # the broker closed the channel or the connection
                self._reconnect()
                raise Unpublishable(f"RabbitMQ: {type(exc).__name__}: {str(exc)[:160]}") from None
        self.published[(exchange, routing_key)] += 1

    def _reconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.release()
        self.connection = Connection(self.stack.broker_url, transport_options={"confirm_publish": False})
        self.channel = self.connection.channel()
        self.producer = Producer(self.channel)

    def publish_raw_amqp(self, exchange: str, routing_key: str, body: bytes,
                         raw_properties: bytes) -> None:
        """Frames a hostile AMQP client sends (RabbitMQ only); Unpublishable when the
        broker closes the channel or the connection over them."""
        assert self.kind == "rabbitmq-postgresql"
        if self._raw is None:
            parts = urlsplit(self.stack.broker_url)
            self._raw = amqp.Connection(host=f"{parts.hostname}:{parts.port}", userid=parts.username,
                                        password=parts.password, virtual_host=self.vhost)
            self._raw.connect()
            self._raw_channel = self._raw.channel()
        try:
            self._raw_channel.basic_publish(CraftedMessage(body, raw_properties),
                                            exchange=exchange, routing_key=routing_key)
            # A synchronous round trip: a frame the broker refused closes the channel first.
            self._raw_channel.exchange_declare(exchange, "direct", passive=True)
        except (amqp.exceptions.AMQPError, OSError) as exc:
            with contextlib.suppress(Exception):
                self._raw.collect()
            self._raw = None
            raise Unpublishable(f"RabbitMQ: {type(exc).__name__}: {str(exc)[:160]}") from None
        self.published[(exchange, routing_key)] += 1

    def write_message_file(self, queue_name: str, payload: bytes) -> str:
        """A message file in the embedded broker's directory, written as whoever can
        write there (every local process: that broker has no users) may write it."""
        assert self.kind == "embedded"
        name = f"{time.time_ns():020d}_{uuid.uuid4().hex}.{queue_name}.msg"
        (self.root / "messages" / queue_name).mkdir(exist_ok=True)
        write_atomically(self.root / "messages" / queue_name / name, payload)
        self.published[("file", queue_name)] += 1
        return name

    def corrupt_files(self) -> list[str]:
        folder = self.root / "corrupt"
        return sorted(os.listdir(folder)) if folder.exists() else []

    # ... the firehose: every message published in the vhost, by anyone (RabbitMQ)

    def start_firehose(self) -> None:
        if self.kind != "rabbitmq-postgresql":
            return
        _rabbitmqctl("trace_on", "-p", self.vhost)
        spy = Queue(SPY_QUEUE, Exchange("amq.rabbitmq.trace", type="topic", passive=True),
                    routing_key="publish.#", durable=False, auto_delete=False)
        spy(self.channel).declare()
        self.published.clear()

    def stop_firehose(self) -> None:
        if self.kind == "rabbitmq-postgresql":
            with contextlib.suppress(Exception):
                _rabbitmqctl("trace_off", "-p", self.vhost)

    def publishes_by_others(self, ignore_exchanges=("celeryev",)) -> Counter:
        """(exchange, routing keys) of messages published since the last call that the
        test did not publish itself; the firehose's record is drained."""
        if self.kind != "rabbitmq-postgresql":
            return Counter()
        seen: Counter = Counter()
        channel = self.connection.channel()
        try:
            while True:
                message = channel.basic_get(SPY_QUEUE, no_ack=True)
                if message is None:
                    break
                headers = message.headers or {}
                if "dbaas_undecodable" in headers:
                    # A copy of a message nested too deep for py-amqp (the test's own deep
                    # frames: dbaas.intake's guard in this process marks it undecodable).
                    continue
                exchange = headers.get("exchange_name", "?")
                for key in headers.get("routing_keys") or [""]:
                    if exchange not in ignore_exchanges:
                        seen[(exchange, key)] += 1
        finally:
            channel.close()
        mine, self.published = self.published, Counter()
        mine = Counter({k: v for k, v in mine.items() if k[0] != "file"})
        return seen - mine

    def close(self) -> None:
        self.stop_firehose()
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.close()
        self.connection.release()


# --- the defender's process


def record_failures(failures: list[str]) -> None:
    """Also into the file named by $HOSTILE_FAILURES, if set: one line per failure."""
    path = os.environ.get("HOSTILE_FAILURES")
    if path and failures:
        with open(path, "a") as out:
            out.write("".join(line.replace("\n", " ") + "\n" for line in failures))


def stop_quickly(worker) -> None:
    """SIGTERM to the worker's main process only (Celery then ends its pool), SIGKILL to
    the whole group if it is not gone within 10 s. (A SIGTERM to the whole group can
    leave billiard waiting forever on a lock a killed pool child held.)"""
    import signal
    process = worker.process
    if process is not None and process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
    worker.stop()  # closes its log (the process is gone by now)


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (a prefork worker's pool children)."""
    children: dict[int, list[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def peak_rss_kb(pid: int) -> int:
    """VmHWM (the peak resident set size so far) of one process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def rss_kb(pid: int) -> int:
    """VmRSS of a process and its descendants, in kB."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class DatabaseLock:
    """Every table the conductor reads or writes, locked by this process while held:
    anything that needs a database transaction waits meanwhile. Refusing a message that a
    MAC or a shape check alone refutes must not."""

    def __init__(self, stack: Stack):
        self.stack = stack
        if stack.kind == "embedded":
            import sqlite3
            path = stack.database_url.split("///", 1)[1]
            self.connection = sqlite3.connect(path, isolation_level=None, timeout=30)
        else:
            import psycopg2
            url = stack.database_url.split("://", 1)[1]
            self.connection = psycopg2.connect("postgresql://" + url)
        self.held = False

    def acquire(self) -> None:
        if self.stack.kind == "embedded":
            # WAL: readers go on, but every conductor transaction is BEGIN IMMEDIATE.
            self.connection.execute("BEGIN EXCLUSIVE")
        else:
            with self.connection.cursor() as cursor:
                cursor.execute("LOCK TABLE instances, backups, watermarks IN ACCESS EXCLUSIVE MODE")
        self.held = True

    def release(self) -> None:
        if self.held:
            if self.stack.kind == "embedded":
                self.connection.execute("ROLLBACK")
            else:
                self.connection.rollback()
            self.held = False

    def close(self) -> None:
        self.release()
        self.connection.close()


# --- guests' messages


@dataclass
class Guest:
    instance_id: str
    secret: str
    generation: int = 1

    def message(self, task: str, args: list, kwargs: dict | None = None) -> dict:
        """kombu publish arguments of a message exactly as this guest builds it."""
        return build_message(self.instance_id, self.secret, self.generation, task, args, kwargs)

    def auth(self, task: str, args: list, kwargs: dict | None = None, **changes) -> dict:
        header = signing.auth_header(signing.instance_principal(self.instance_id), self.secret,
                                     task, args, kwargs or {}, generation=self.generation)
        return {**header, **changes}


def heartbeat_args(instance_id: str, status: str = "crashed", sent: float | None = None) -> list:
    return [instance_id, {"service_status": status}, time.time() if sent is None else sent]


def body_of(args, kwargs=None, embed=None) -> bytes:
    return json.dumps([args, kwargs or {}, embed if embed is not None else
                       {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()


def virtual_payload(body: bytes, headers: dict, queue_name: str, content_type="application/json",
                    content_encoding="utf-8", **properties) -> dict:
    """A message file's content as kombu's virtual transports write it."""
    return {"body": base64.b64encode(body).decode(), "content-encoding": content_encoding,
            "content-type": content_type, "headers": headers,
            "properties": {"delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                           "delivery_info": {"exchange": queue_name, "routing_key": queue_name},
                           "delivery_tag": str(uuid.uuid4()), **properties}}


# --- cases and their runner


@dataclass
class Case:
    """One hostile message (or a few, ``count``) of a class.

    expect: "refused" — each message gets a refusal line; "no effect" — the message may
    be taken (a stale or harmless one) but changes nothing; "set aside" — the embedded
    broker moves the file to corrupt/; "handled" — either of those two.
    unpublishable: stack kinds where the client or broker is expected to refuse to carry
    it (then that is asserted and the case ends there).
    needs_db: refused only after a database read (a valid signature whose sender's
    credentials or target must be looked up); every other case is refused while the
    test holds the database locked.
    """
    name: str
    send: Callable[[], None]
    expect: str = "refused"
    count: int = 1
    unpublishable: tuple = ()
    needs_db: bool = False
    only: tuple = ("rabbitmq-postgresql", "embedded")
    after: Callable[[], str | None] | None = None  # once handled: what else is wrong, if anything
    taken: Callable[[], bool] | None = None  # whether the defender visibly acted on it (ends the wait)


@dataclass
class Process:
    """A worker process of the defender: started, restarted after a death, inspected."""
    start: Callable[[], object]     # -> an object with .process (Popen), .log(), .stop()
    queues: tuple                   # the queues it consumes (purged after a death)
    current: object = None
    deaths: list = field(default_factory=list)

    def alive(self) -> bool:
        return self.current is not None and self.current.process.poll() is None

    def log(self) -> str:
        return self.current.log() if self.current is not None else ""


class Runner:
    """Sends a class's cases to a defender and checks what the class must leave behind."""

    def __init__(self, stack: Stack, broker: Broker, process: Process,
                 valid: Callable[[], Callable[[], bool]], refusal_timeout: float = 15,
                 refusal: re.Pattern = REFUSAL, checks: Callable[[], list[str]] | None = None,
                 others_may_publish_to: tuple = ("celeryev",)):
        self.stack, self.broker, self.process = stack, broker, process
        self.others_may_publish_to = others_may_publish_to  # exchanges: events, a guest's heartbeats
        self.refusal = refusal  # one line per refused message, with a group "reason"
        self.checks = checks    # more checks after a class: what is wrong, if anything
        self.valid = valid  # sends a valid message; returns a predicate: "it was served"
        self.refusal_timeout = refusal_timeout
        self.failures: list[str] = []
        self._log_offset = 0
        self._before: list | None = None  # the database when the class began

    # ... log

    def _new_log(self) -> str:
        text_ = self.process.log()
        new, self._log_offset = text_[self._log_offset:], len(text_)
        return new

    def ensure_running(self) -> None:
        if not self.process.alive():
            if self.process.current is not None:
                stop_quickly(self.process.current)
            self.broker.purge(*self.process.queues)
            self.process.current = self.process.start()
            self._log_offset = 0
            # Serving, not only started: a valid message goes through first. What it changes
            # in the database is not the class's doing.
            before_valid = snapshot()
            wait_until(self.valid(), timeout=60, interval=0.1, message="a valid message served after a start")
            if self._before is not None:
                after_valid = snapshot()
                gone = [row for row in before_valid if row not in after_valid]
                self._before = sorted([row for row in self._before if row not in gone]
                                      + [row for row in after_valid if row not in before_valid], key=repr)
            self.broker.publishes_by_others(self.others_may_publish_to)
            self._new_log()

    # ... one class

    def run(self, klass: str, cases: list[Case], lock_database: bool = True,
            expect_unchanged: bool = True) -> list[str]:
        """Every case of ``klass``, then the checks after a class; the failures, each
        naming the class and case."""
        self.failures = []
        self._before = None
        self.ensure_running()
        self.broker.publishes_by_others()  # forget what came before this class
        self._before = snapshot()
        lock = DatabaseLock(self.stack) if lock_database else None
        try:
            for case in cases:
                if self.stack.kind in case.only:
                    self._one(klass, case, None if case.needs_db else lock)
        finally:
            if lock is not None:
                lock.close()
        self._after_class(klass, self._before, expect_unchanged)
        self._before = None
        return self.failures

    def fail(self, klass: str, case: str, what: str) -> None:
        self.failures.append(f"[{self.stack.kind}] {klass} / {case}: {what}")

    def _outcome(self, case: Case, seen: str, corrupt_before: int) -> bool:
        if case.taken is not None and case.taken():
            return True
        if case.expect == "refused":
            return len(self.refusal.findall(seen)) >= case.count
        if case.expect == "set aside":
            return len(self.broker.corrupt_files()) > corrupt_before
        if case.expect == "handled":  # refused, or set aside by the embedded broker
            return bool(self.refusal.search(seen)) or len(self.broker.corrupt_files()) > corrupt_before
        return not self.broker.nonempty()  # "no effect": taken (the class's end checks the rest)

    def _wait(self, case: Case, corrupt_before: int, timeout: float) -> tuple[str, str]:
        """("done" | "dead" | "timeout", the log written meanwhile)."""
        seen = ""
        deadline = time.monotonic() + timeout
        while True:
            seen += self._new_log()
            if not self.process.alive() or "Unrecoverable error" in seen:
                return "dead", seen
            if self._outcome(case, seen, corrupt_before):
                time.sleep(0.05)
                return "done", seen + self._new_log()
            if time.monotonic() > deadline:
                return "timeout", seen
            time.sleep(0.05 if case.expect != "no effect" else 0.3)

    def _settle(self, case: Case, corrupt_before: int) -> tuple[str, str]:
        """After a case was not refused in time: "refused late", "taken" (its queue empty
        and no refusal), "dead" or "timeout"."""
        seen, empty_since = "", None
        deadline = time.monotonic() + self.refusal_timeout
        while time.monotonic() < deadline:
            seen += self._new_log()
            if not self.process.alive() or "Unrecoverable error" in seen:
                return "dead", seen
            if self._outcome(case, seen, corrupt_before):
                return "refused late", seen + self._new_log()
            if self.broker.nonempty():
                empty_since = None
            elif empty_since is None:
                empty_since = time.monotonic()
            elif time.monotonic() - empty_since > 0.5:
                return "taken", seen + self._new_log()
            time.sleep(0.1)
        return "timeout", seen

    def _one(self, klass: str, case: Case, lock: "DatabaseLock | None") -> None:
        """One case: sent (with the database locked unless it needs it), then its outcome."""
        self.ensure_running()
        self._new_log()
        corrupt_before = len(self.broker.corrupt_files()) if self.stack.kind == "embedded" else 0
        if lock is not None:
            lock.acquire()
        try:
            try:
                case.send()
            except Unpublishable as exc:
                if self.stack.kind not in case.unpublishable:
                    self.fail(klass, case.name, f"could not be published ({exc}); expected to be")
                return
            if lock is None:
                state, seen = self._settle(case, corrupt_before)
                if state == "refused late" or (state == "taken" and case.expect == "no effect"):
                    state = "done"
                elif state == "taken":
                    self.fail(klass, case.name, "ACCEPTED: taken without any refusal")
                    return
            else:
                state, seen = self._wait(case, corrupt_before, 3)
            if state == "timeout" and lock is not None:
                # Not refused while the database was locked: see what becomes of it.
                lock.release()
                state, later = self._settle(case, corrupt_before)
                seen += later
                if state in ("refused late", "taken"):
                    refused = [m["reason"] for m in self.refusal.finditer(later)]
                    self.fail(klass, case.name, (
                        f"refused only once the database was unlocked (its refusal took a database "
                        f"transaction): {refused[-1][:200]!r}") if refused else (
                        "ACCEPTED: taken (it went to the database) without any refusal"))
                    return
        finally:
            if lock is not None:
                lock.release()
        if state == "dead":
            self._died(klass, case, seen)
            return
        if state == "timeout":
            self.fail(klass, case.name, f"no {case.expect!r} outcome within {self.refusal_timeout:.0f}s; "
                      f"queues holding messages: {self.broker.nonempty()}; log since: {seen[-1500:]!r}")
            return
        if case.after is not None and (problem := case.after()):
            self.fail(klass, case.name, problem)
        if case.expect in ("refused", "handled"):
            for match in self.refusal.finditer(seen):
                if not match["reason"].strip():
                    self.fail(klass, case.name, f"refusal without a reason: {match[0]!r}")
            if "Traceback" in seen and "Can't decode message body" not in seen:
                # (Celery's own handler of undecodable bodies logs its traceback by design.)
                self.fail(klass, case.name, f"refused, but through an exception (a traceback was logged): "
                          f"{[m['reason'] for m in self.refusal.finditer(seen)][-1:]}; "
                          f"{seen[seen.index('Traceback'):][-600:]!r}")

    def _died(self, klass: str, case: Case, seen: str) -> None:
        with contextlib.suppress(Exception):  # "Unrecoverable error": it is on its way out
            self.process.current.process.wait(timeout=20)
        full = self.process.log()
        lines = [line for line in full.splitlines() if "Error" in line or "error" in line]
        crash = next((line for line in reversed(full.splitlines())
                      if re.match(r"\w*(Error|Exception)\b", line)), "?")
        requeued = ""
        with contextlib.suppress(Exception):
            time.sleep(0.5)
            held = self.broker.nonempty()
            requeued = f"; the message is back in the broker: {held}" if held else ""
        self.process.deaths.append((klass, case.name, crash, str(self.process.current.log_path)))
        self.fail(klass, case.name, f"the worker process DIED (exit {self.process.current.process.poll()}): "
                  f"{crash}{requeued}; log lines: {lines[-4:]}")
        self.ensure_running()

    def _after_class(self, klass: str, before: list, expect_unchanged: bool) -> None:
        if not self.process.alive():
            self.fail(klass, "after the class", "the worker is not alive")
            self.ensure_running()
        try:
            wait_until(lambda: not self.broker.nonempty(), timeout=15, interval=0.3,
                       message="every queue empty")
        except AssertionError:
            self.fail(klass, "after the class", f"queues still hold messages: {self.broker.nonempty()}")
        if expect_unchanged:
            after = snapshot()
            if after != before:
                changed = [row for row in after if row not in before]
                gone = [row for row in before if row not in after]
                self.fail(klass, "after the class", f"the database changed: now {changed}, was {gone}")
        if self.checks is not None:
            for problem in self.checks():
                self.fail(klass, "after the class", problem)
        others = self.broker.publishes_by_others(self.others_may_publish_to)
        if others:
            self.fail(klass, "after the class", f"someone other than the test published: {dict(others)}")
        served = self.valid()
        try:
            wait_until(served, timeout=30, interval=0.1, message="a valid message served")
        except AssertionError:
            self.fail(klass, "after the class", f"a valid message sent afterwards was not served; "
                      f"log tail: {self.process.log()[-1500:]!r}")
        self.broker.publishes_by_others()


def watermark(kind: str, key: str) -> float | None:
    with db.session_scope() as session:
        return session.scalar(select(Watermark.sent).where(Watermark.kind == kind, Watermark.key == key))


def run_in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread
