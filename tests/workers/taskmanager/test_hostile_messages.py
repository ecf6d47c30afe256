"""The taskmanager against an attacker who holds one guest's credentials (instance A) and
can publish to the taskmanager's queue (a broker whose permissions let it, or the
embedded broker, which has none): guest-signed CRUD, unsigned and forged messages,
malformed bodies and headers, deep nesting, ETA and callbacks, frames and files no kombu
client writes. Each is refused with a log line; afterwards the taskmanager is alive, has
started, stopped and deleted nothing (no guest process, no instance directory, no broker
user), has published nothing (every queue empty; on RabbitMQ the firehose shows that only
the test published), and a valid service-signed task is still carried out.

No conductor runs here: a cast the taskmanager was tricked into would wait in the control
queue, where the checks see it.
"""

import json
import pickle
import shlex
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from dbaas import signing, wire
from dbaas.queues import queue
from tests.support.hostile import (CONTROL_QUEUE, GUESTS_QUEUE, REPLY_QUEUE, SINK_QUEUE,
                                   TASKMANAGER_QUEUE, Broker, Case, Guest, Process, Runner, amqp_table,
                                   basic_properties, body_of, deep_table_value, module_stack,
                                   record_failures, stop_quickly, virtual_payload)
from tests.support.services import Worker, wait_until
from tests.support.stack import SERVICE_KEY, SLEEP, make_backup, make_instances, processes_of
from workers.guestagent.commands import command_queue
from workers.guestagent.client import build_message
from workers.taskmanager.compute.local import instances_root

BOTH = ("rabbitmq-postgresql", "embedded")
RABBIT, EMBEDDED = ("rabbitmq-postgresql",), ("embedded",)
ZEROS = "0" * 64
Q = TASKMANAGER_QUEUE


def service_message(task: str, args: list, kwargs: dict | None = None) -> dict:
    """A task message as the control plane sends it: signed with the service key."""
    message = build_message("service", "unused", 1, task, args, kwargs)
    message["headers"][wire.AUTH_HEADER] = signing.auth_header(signing.SERVICE_PRINCIPAL, SERVICE_KEY,
                                                               task, args, kwargs or {})
    return message


class System:
    def __init__(self, stack):
        self.stack = stack
        secrets = make_instances(2)
        (a, sa), (b, sb) = secrets.items()
        self.a, self.b = Guest(a, sa), Guest(b, sb)
        self.backup_b = make_backup(b)
        self.valid_id = str(uuid.uuid4())  # the instance of the valid task sent after each class
        self.instances = [a, b, self.valid_id]
        self.broker = Broker(stack)
        self.broker.declare(queue(GUESTS_QUEUE), queue(CONTROL_QUEUE), queue(TASKMANAGER_QUEUE),
                            queue(SINK_QUEUE), Queue(REPLY_QUEUE, Exchange(""), routing_key=REPLY_QUEUE),
                            *(command_queue(i) for i in self.instances))
        self.broker.start_firehose()
        # Calls answered by nobody (no conductor here) give up after 2 s: the reconcile a
        # taskmanager runs on start ends soon.
        env = {**stack.client_env(), "DBAAS_GUEST_COMMAND": shlex.join([sys.executable, "-c", SLEEP]),
               "DBAAS_CALL_TIMEOUT": "2"}

        def start():
            worker = Worker(env, stack.tmp_path / f"taskmanager-{uuid.uuid4().hex[:6]}.log", queue=Q).start()
            # Its reconcile on start calls the conductor: no conductor answers here; the call
            # and the reconcile task itself are the taskmanager's own doing, not the attack's.
            wait_until(lambda: "reconcile skipped" in worker.log() or "reconcile" not in worker.log(),
                       timeout=30, message="the reconcile on start over")
            time.sleep(0.5)
            self.broker.purge(CONTROL_QUEUE)
            self.broker.publishes_by_others()
            return worker
        self.process = Process(start=start, queues=(Q,))
        self.runner = Runner(stack, self.broker, self.process, valid=self.valid_task, checks=self.nothing_done)

    def valid_task(self):
        """delete_backup of a backup with no stored file: the taskmanager casts
        conductor.backup_deleted (to the control queue, where it is read here)."""
        backup_id = str(uuid.uuid4())
        self.broker.publish(Q, Q, **service_message("taskmanager.delete_backup", [backup_id, None]))

        def served():
            with Connection(self.stack.broker_url) as connection, \
                    connection.SimpleQueue(queue(CONTROL_QUEUE)) as casts:
                try:
                    message = casts.get(timeout=0.2)
                except casts.Empty:
                    return False
                message.ack()
                args = json.loads(message.body)[0]
                auth = message.headers.get(wire.AUTH_HEADER)
                return message.headers.get("task") == "conductor.backup_deleted" and args == [backup_id] \
                    and auth == signing.auth_header("service", SERVICE_KEY, "conductor.backup_deleted", args, {})
        return served

    def nothing_done(self) -> list[str]:
        problems = []
        root = Path(instances_root())
        made = sorted(p.name for p in root.iterdir()) if root.exists() else []
        if made:
            problems.append(f"instance directories were made: {made}")
        running = {i: processes_of(i) for i in self.instances}
        if any(running.values()):
            problems.append(f"guest processes were started: {running}")
        if self.stack.kind == "rabbitmq-postgresql":
            import subprocess
            users = subprocess.run(["rabbitmqctl", "-q", "list_users"], capture_output=True, text=True,
                                   timeout=60).stdout
            made_users = [i for i in self.instances if wire.guest_broker_user(i) in users]
            if made_users:
                problems.append(f"broker users were made for {made_users}")
        return problems

    def case(self, name, task="taskmanager.delete_instance", args=None, kwargs=None, signer="A",
             unpublishable=(), only=BOTH, **replace):
        args = [self.b.instance_id] if args is None else args

        def send():
            if signer == "service":
                message = service_message(task, args, kwargs)
            else:
                message = (self.a if signer == "A" else self.b).message(task, args, kwargs)
            if signer is None:
                message["headers"] = {k: v for k, v in message["headers"].items() if k != wire.AUTH_HEADER}
            for key, value in replace.items():
                message[key] = value(message[key]) if key == "headers" and callable(value) else value
            self.broker.publish(Q, Q, **message)
        return Case(name, send, unpublishable=unpublishable, only=only)

    def raw(self, name, body, properties, unpublishable=()):
        return Case(name, lambda: self.broker.publish_raw_amqp(Q, Q, body, properties),
                    unpublishable=unpublishable, only=RABBIT)

    def file(self, name, payload: bytes):
        return Case(name, lambda: self.broker.write_message_file(Q, payload), expect="handled", only=EMBEDDED)

    def close(self):
        if self.process.current is not None:
            stop_quickly(self.process.current)
        self.broker.close()


@pytest.fixture(scope="module", params=["rabbitmq-postgresql", "embedded"])
def system(request, tmp_path_factory):
    with module_stack(request.param, tmp_path_factory.mktemp(request.param)) as stack:
        built = System(stack)
        try:
            yield built
        finally:
            built.close()


def check(failures):
    record_failures(failures)
    if failures:
        pytest.fail(f"{len(failures)} failure(s):\n" + "\n".join(failures), pytrace=False)


def test_who_may_call(system):
    """Guest-signed CRUD, unsigned, forged service signatures, tasks not served here."""
    s, a, b = system, system.a.instance_id, system.b.instance_id
    bogus = {"v": 1, "principal": "service", "mac": ZEROS}
    cases = [
        s.case("guest-signed delete_instance of B"),
        s.case("guest-signed delete_instance of A itself", args=[a]),
        s.case("guest-signed create_instance", task="taskmanager.create_instance", args=[b, "sqlite", None, 1]),
        s.case("guest-signed restart_instance of B", task="taskmanager.restart_instance", args=[b, 1]),
        s.case("guest-signed create_backup of B", task="taskmanager.create_backup", args=[s.backup_b, b, 1]),
        s.case("guest-signed delete_backup of B's backup", task="taskmanager.delete_backup",
               args=[s.backup_b, "file:///etc/passwd"]),
        s.case("another guest's key (B's) on B", signer="B"),
        s.case("unsigned delete_instance", signer=None),
        s.case("service principal, zero MAC", headers=lambda m: {**m, wire.AUTH_HEADER: bogus}),
        s.case("service principal, A's key", headers=lambda m: {**m, wire.AUTH_HEADER: signing.auth_header(
            "service", s.a.secret, "taskmanager.delete_instance", [b], {})}),
        s.case("service principal, non-ASCII MAC", headers=lambda m: {**m, wire.AUTH_HEADER: {
            **bogus, "mac": "\u00e9" * 64}}),
        s.case("dbaas_auth a string", headers=lambda m: {**m, wire.AUTH_HEADER: "service"}),
        s.case("a conductor task on the taskmanager's queue (service-forged)",
               task="conductor.instance_update", args=[b], kwargs={"task_status": "DELETING"},
               headers=lambda m: {**m, wire.AUTH_HEADER: bogus}),
        s.case("a Celery builtin (celery.chord_unlock)", task="celery.chord_unlock", args=[]),
        s.case("a guest task on the taskmanager's queue", task=wire.HEARTBEAT_TASK,
               args=[a, {"service_status": "running"}, time.time()]),
        s.case("an unknown task", task="taskmanager.drop_everything", args=[]),
    ]
    check(s.runner.run("who may call", cases, lock_database=False))


def test_malformed(system):
    s, b = system, system.b.instance_id
    cases = [
        *[s.case(name, body=body) for name, body in [
            ("empty body", b""), ("not JSON", b"{not json"), ("a number", b"5"), ("an object", b"{}"),
            ("two elements", json.dumps([[b], {}]).encode()), ("args an object", json.dumps([{}, {}, {}]).encode()),
            ("65 KiB", json.dumps([[b], {"pad": "x" * 66_000}, {}]).encode())]],
        s.case("no headers", headers={}),
        s.case("'task' a list", headers=lambda m: {**m, "task": ["taskmanager.delete_instance"]}),
        s.case("no 'id'", headers=lambda m: {k: v for k, v in m.items() if k != "id"}),
        s.case("'timelimit' a string", headers=lambda m: {**m, "timelimit": "10"}),
        s.case("unknown header", headers=lambda m: {**m, "foo": 1}),
        s.case("pickle", body=pickle.dumps([[b], {}, {}]), content_type="application/x-python-serialize",
               content_encoding="binary"),
        s.case("compression header, body not compressed", headers=lambda m: {**m, "compression": "application/x-gzip"}),
        s.case("content encoding 'utf-16'", body=body_of([b]).decode().encode("utf-16"), content_encoding="utf-16"),
        s.case("NaN in the arguments", body=b'[[NaN], {}, {}]'),
        s.case("'x-junk' header of 120 KB (service-forged)", headers=lambda m: {
            **m, "x-junk": "x" * 120_000, wire.AUTH_HEADER: {"v": 1, "principal": "service", "mac": ZEROS}}),
    ]
    check(s.runner.run("malformed", cases, lock_database=False))


def test_depth(system):
    s, b = system, system.b.instance_id
    nested = "[" * 5_000 + "]" * 5_000
    headers = s.a.message("taskmanager.delete_instance", [b])["headers"]
    table = [(k, v) for k, v in headers.items() if v is not None]
    cases = [
        s.case("args nested 5,000", body=f"[[{nested}], {{}}, {{}}]".encode()),
        s.case("kwargs nested 5,000", body=('[[], {"a": ' + '{"a":' * 5_000 + "0" + "}" * 5_000 + "}, {}]").encode()),
        s.case("embed nested 5,000", body=f'[[], {{}}, {{"callbacks": {nested}}}]'.encode()),
        s.case("args nested 13 (signed)", args=[[[[[[[[[[[[[[b]]]]]]]]]]]]]]),
        s.raw("AMQP header table nested 3,000", body_of([b]),
              basic_properties(headers=amqp_table(table + [("x-deep", deep_table_value(3_000))]))),
        s.file("file: headers nested 100,000", json.dumps(virtual_payload(body_of([b]), headers, Q)).replace(
            '"headers": {', '"headers": {"x-deep": ' + "[" * 100_000 + "]" * 100_000 + ", ", 1).encode()),
    ]
    check(s.runner.run("depth", cases, lock_database=False))


def test_delivery_options_and_callbacks(system):
    s, b = system, system.b.instance_id
    now = datetime.now(timezone.utc)
    year = (now + timedelta(days=365)).isoformat()
    callback = {"task": "conductor.instance_update", "args": [b], "kwargs": {"task_status": "DELETING"},
                "options": {"queue": CONTROL_QUEUE}, "immutable": True, "subtask_type": None}
    cases = [
        s.case("guest-signed, ETA a year ahead", headers=lambda m: {**m, "eta": year}),
        s.case("service-forged, ETA a year ahead", headers=lambda m: {
            **m, "eta": year, wire.AUTH_HEADER: {"v": 1, "principal": "service", "mac": ZEROS}}),
        s.case("guest-signed, expires", headers=lambda m: {**m, "expires": (now + timedelta(hours=1)).isoformat()}),
        s.case("guest-signed, retries 3", headers=lambda m: {**m, "retries": 3}),
        s.case("guest-signed, reply_to", reply_to=REPLY_QUEUE, correlation_id=str(uuid.uuid4())),
        s.case("guest-signed, callback to the conductor",
               body=json.dumps([[b], {}, {"callbacks": [callback], "errbacks": None, "chain": None,
                                          "chord": None}]).encode()),
        s.case("guest-signed, chain", body=json.dumps([[b], {}, {"chain": [callback]}]).encode()),
        s.case("guest-signed, errback to a queue of the test", body=json.dumps([[b], {}, {"errbacks": [
            {**callback, "options": {"queue": SINK_QUEUE}}]}]).encode()),
        s.case("group header", headers=lambda m: {**m, "group": str(uuid.uuid4())}),
    ]
    check(s.runner.run("ETA, expires, retries, reply-to, callbacks", cases, lock_database=False))


def test_wire(system):
    s, b = system, system.b.instance_id
    headers = s.a.message("taskmanager.delete_instance", [b])["headers"]
    table = [(k, v) for k, v in headers.items() if v is not None]
    body = body_of([b])
    payload = virtual_payload(body, headers, Q)
    cases = [
        s.raw("content type not UTF-8", body, basic_properties(content_type=b"application/json\xff",
                                                               headers=amqp_table(table))),
        s.raw("reply_to not UTF-8", body, basic_properties(headers=amqp_table(table), reply_to=b"\xff")),
        s.raw("header name not UTF-8", body, basic_properties(headers=amqp_table(table + [(b"\xff", 1)]))),
        s.raw("no properties at all", body, basic_properties(content_type=None, content_encoding=None,
                                                             delivery_mode=None)),
        s.file("file: not JSON", b"{not json"),
        s.file("file: delivery tag a list", json.dumps({**payload, "properties": {
            **payload["properties"], "delivery_tag": ["x"]}}).encode()),
        s.file("file: body not base64", json.dumps({**payload, "body": "%%%"}).encode()),
        s.file("file: headers a list", json.dumps({**payload, "headers": [1]}).encode()),
        s.file("file: delivery_info a string", json.dumps({**payload, "properties": {
            **payload["properties"], "delivery_info": "x"}}).encode()),
    ]
    check(s.runner.run("wire", cases, lock_database=False))
