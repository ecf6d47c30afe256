"""The conductor against an attacker who holds one guest's credentials (instance A) and
can publish anything to the broker: every class of hostile message, sent to a real
conductor worker on RabbitMQ + PostgreSQL and on the embedded broker.

Per class (shape, headers, depth, encoding, canvas/embed, ETA and the like, signature,
wire-level frames or files, the control queue, a flood), each case is sent on its own and
must be refused with a log line giving a reason — those a MAC or a shape check refutes
while the test holds the database locked, so a refusal that costs a transaction shows.
After each class: the worker is alive, the database is unchanged, every queue of the
broker is empty (nothing held or redelivered forever, nothing published elsewhere: on
RabbitMQ the vhost's firehose shows that only the test published), and a valid heartbeat
sent afterwards is applied. A case that kills the worker is named, its message purged and
the worker started again, so that the rest of the class is still tried.

Issue 6 is what these tests hold the conductor to.
"""

import base64
import gzip
import json
import os
import pickle
import subprocess
import sys
import time
import uuid
import zlib
from datetime import datetime, timedelta, timezone

import pytest
from kombu import Exchange, Queue

from dbaas import db, signing, wire
from dbaas.models import Instance
from dbaas.queues import queue
from tests.support.hostile import (CONTROL_QUEUE, GUESTS_QUEUE, REFUSAL, REPLY_QUEUE, SINK_QUEUE,
                                   TASKMANAGER_QUEUE, Broker, Case, Guest, Process, Raw, Runner,
                                   amqp_table, basic_properties, body_of, deep_table_value,
                                   heartbeat_args, module_stack, peak_rss_kb, record_failures, rss_kb,
                                   run_in_thread, stop_quickly, virtual_payload, watermark)
from tests.support.services import ROOT, wait_until
from tests.support.stack import SERVICE_KEY, make_backup, make_instances, snapshot
from workers.guestagent.commands import command_queue

HB, UB = wire.HEARTBEAT_TASK, wire.UPDATE_BACKUP_TASK
BOTH = ("rabbitmq-postgresql", "embedded")
RABBIT, EMBEDDED = ("rabbitmq-postgresql",), ("embedded",)
ZEROS = "0" * 64
PWNED = f"/tmp/redteam-pwned-{uuid.uuid4().hex}"  # created only if a hostile payload ran
NOW = object()  # in a case's arguments: the time it is sent (so that a taken message is not stale)


class System:
    """One conductor on one stack, the attacker's guest A, a victim B, a deleted C."""

    def __init__(self, stack):
        self.stack = stack
        secrets = make_instances(3)
        (a, sa), (b, sb), (c, sc) = secrets.items()
        self.a, self.b, self.c = Guest(a, sa), Guest(b, sb), Guest(c, sc)
        self.backup_a, self.backup_b = make_backup(a), make_backup(b)

        def delete_c(session):
            session.get(Instance, c).deleted = True
        db.run_transaction(delete_c)
        self.broker = Broker(stack)
        # Every queue a conductor could be tricked into publishing to exists, so that a
        # message published there is seen (and on RabbitMQ the firehose sees any publish).
        self.broker.declare(queue(GUESTS_QUEUE), queue(CONTROL_QUEUE), queue(TASKMANAGER_QUEUE),
                            queue(SINK_QUEUE), Queue(REPLY_QUEUE, Exchange(""), routing_key=REPLY_QUEUE),
                            *(command_queue(i) for i in secrets))
        self.broker.start_firehose()
        self.process = Process(start=lambda: stack.worker("conductor").start(),
                               queues=(GUESTS_QUEUE, CONTROL_QUEUE))
        self.runner = Runner(stack, self.broker, self.process, valid=self.valid_heartbeat)
        self.runner.ensure_running()
        # B reports once (its message is kept: replaying it is a case); A has a watermark.
        self.b_message = self.b.message(HB, heartbeat_args(b, "running"))
        self.broker.publish(GUESTS_QUEUE, GUESTS_QUEUE, **self.b_message)
        served = self.valid_heartbeat()
        wait_until(lambda: served() and watermark("heartbeat", b) is not None, timeout=30,
                   message="the first heartbeats")
        self._status = "running"

    def valid_heartbeat(self):
        """A valid heartbeat of A; returns 'it was applied'."""
        self._status = "healthy" if getattr(self, "_status", "") == "running" else "running"
        sent = time.time()
        self.broker.publish(GUESTS_QUEUE, GUESTS_QUEUE, **self.a.message(HB, heartbeat_args(self.a.instance_id, self._status, sent)))
        return lambda: watermark("heartbeat", self.a.instance_id) == sent

    # --- how the attacker sends

    def to_guests(self, body=None, headers=None, task=HB, args=None, kwargs=None, guest=None,
                  queue_name=GUESTS_QUEUE, **properties):
        """A message of ``guest`` (A by default) signed over ``args``/``kwargs``; any part replaced."""
        guest = guest or self.a
        args = heartbeat_args(guest.instance_id) if args is None else [time.time() if arg is NOW else arg
                                                                       for arg in args]
        message = guest.message(task, args, kwargs)
        if body is not None:
            message["body"] = body
        if headers is not None:
            message["headers"] = headers(message["headers"]) if callable(headers) else headers
        message.update(properties)
        self.broker.publish(queue_name, queue_name, **message)

    def case(self, name, expect="refused", unpublishable=(), needs_db=False, only=BOTH, count=1, **message):
        return Case(name, lambda: self.to_guests(**message), expect=expect, count=count,
                    unpublishable=unpublishable, needs_db=needs_db, only=only)

    def raw(self, name, body: bytes, properties: bytes, queue_name=GUESTS_QUEUE, unpublishable=(), expect="refused"):
        """Raw AMQP frames (RabbitMQ only)."""
        return Case(name, lambda: self.broker.publish_raw_amqp(queue_name, queue_name, body, properties),
                    expect=expect, unpublishable=unpublishable, only=RABBIT)

    def file(self, name, payload: bytes, queue_name=GUESTS_QUEUE, expect="set aside"):
        """A message file written straight into the embedded broker's directory."""
        return Case(name, lambda: self.broker.write_message_file(queue_name, payload),
                    expect=expect, only=EMBEDDED)

    def signed_headers(self, task=HB, args=None, kwargs=None, guest=None, **changes):
        guest = guest or self.a
        args = heartbeat_args(guest.instance_id) if args is None else args
        return {**guest.message(task, args, kwargs)["headers"], **changes}

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
            deaths = built.process.deaths
            if deaths:
                print(f"\n{stack.kind}: the conductor died {len(deaths)} time(s): "
                      + "; ".join(f"{k}/{c}: {e} (log {p})" for k, c, e, p in deaths))


def check(failures):
    record_failures(failures)
    if failures:
        pytest.fail(f"{len(failures)} failure(s):\n" + "\n".join(failures), pytrace=False)


def without(headers: dict, *names) -> dict:
    return {k: v for k, v in headers.items() if k not in names}


def nested_list(depth: int):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_dict(depth: int):
    value = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int) -> str:
    return '{"a":' * depth + "0" + "}" * depth


# --- shape: the body is not a JSON [list, dict, dict]


def test_shape(system):
    s, a = system, system.a.instance_id
    args = heartbeat_args(a)
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    triple = json.dumps([args, {}, embed]).encode()
    bodies = {
        "empty body": b"", "whitespace": b"  \n\t ", "NUL bytes": b"\x00" * 64,
        "null": b"null", "true": b"true", "a number": b"42", "a float": b"1.5e3", "a string": b'"hello"',
        "an object": b"{}", "an object with args/kwargs/embed": json.dumps(
            {"args": args, "kwargs": {}, "embed": embed}).encode(),
        "empty list": b"[]", "one element": json.dumps([args]).encode(),
        "two elements": json.dumps([args, {}]).encode(),
        "four elements": json.dumps([args, {}, embed, {}]).encode(),
        "args an object": json.dumps([{"instance_id": a}, {}, embed]).encode(),
        "args a string": json.dumps([a, {}, embed]).encode(),
        "args null": json.dumps([None, {}, embed]).encode(),
        "kwargs a list": json.dumps([args, [], embed]).encode(),
        "kwargs null": json.dumps([args, None, embed]).encode(),
        "kwargs a string": json.dumps([args, "x", embed]).encode(),
        "embed a list": json.dumps([args, {}, []]).encode(),
        "embed null": json.dumps([args, {}, None]).encode(),
        "embed a number": json.dumps([args, {}, 1]).encode(),
        "the triple nested in a list": json.dumps([[args, {}, embed]]).encode(),
        "the triple double-encoded": json.dumps(triple.decode()).encode(),
        "not JSON": b"{not json", "truncated": triple[:-1], "trailing garbage": triple + b" x",
        "two documents": triple + triple, "a JSON array of 10,000 numbers": json.dumps(
            [list(range(10_000)), {}, embed]).encode(),
        "65 KiB (over the limit)": json.dumps([args, {"pad": "x" * 66_000}, embed]).encode(),
        "8 MiB": json.dumps([args, {"pad": "x" * (8 << 20)}, embed]).encode(),
    }
    cases = [s.case(name, body=body, args=args) for name, body in bodies.items()]
    # The same with update_backup, a CRUD task name and an unknown one (issue 6: only
    # heartbeats survived these before).
    for task in (UB, "conductor.instance_update", "conductor.no_such_task"):
        for name in ("empty body", "a number", "two elements", "an object", "not JSON"):
            cases.append(s.case(f"{name} ({task})", body=bodies[name], task=task,
                                args=[a, s.backup_a, time.time()]))
    check(s.runner.run("shape", cases))


# --- headers: missing, of the wrong type, unknown, huge, broker-style junk


def test_headers(system):
    s, a = system, system.a.instance_id
    stale = heartbeat_args(a, "crashed", sent=1.0)  # taken or not, it changes nothing
    cases = [
        s.case("no headers at all", headers={}),
        *[s.case(f"no {name!r}", headers=lambda m, n=name: without(m, n))
          for name in ("task", "id", wire.AUTH_HEADER)],
        *[s.case(f"'task' is {label}", headers=lambda m, v=value: {**m, "task": v})
          for label, value in [("a list", [HB]), ("a mapping", {"name": HB}), ("a number", 1),
                               ("null", None), ("true", True), ("empty", ""), ("300 characters", "x" * 300),
                               ("a CRUD task", "conductor.instance_update"),
                               ("a Celery builtin (chord_unlock)", "celery.chord_unlock"),
                               ("a Celery builtin (backend_cleanup)", "celery.backend_cleanup"),
                               ("an import path", "workers.conductor.manager.instance_deleted"),
                               ("the heartbeat with a trailing space", HB + " "),
                               ("the heartbeat in capitals", HB.upper())]],
        *[s.case(f"'id' is {label}", headers=lambda m, v=value: {**m, "id": v})
          for label, value in [("a number", 7), ("a list", ["x"]), ("null", None), ("empty", ""),
                               ("65 characters", "x" * 65), ("a mapping", {"id": "x"})]],
        *[s.case(f"{name!r} is {label}", headers=lambda m, n=name, v=value: {**m, n: v})
          for name, label, value in [
              ("lang", "a number", 1), ("shadow", "a number", 5), ("eta", "a number", 5),
              ("expires", "a number", 5.0), ("group", "a string", "g"), ("group_index", "a number", 0),
              ("retries", "a string", "0"), ("retries", "true", True), ("retries", "a float", 0.0),
              ("timelimit", "a string", "10"), ("timelimit", "one number", [1]),
              ("timelimit", "three numbers", [1, 2, 3]), ("timelimit", "strings", ["a", "b"]),
              ("timelimit", "booleans", [True, None]),
              ("ignore_result", "a string", "yes"), ("origin", "a number", 5), ("argsrepr", "a list", []),
              ("root_id", "a list", []), ("parent_id", "a mapping", {}), ("stamps", "a string", "x"),
              ("stamped_headers", "a string", "x"), ("replaced_task_nesting", "a string", "1"),
              ("celery_beat_task", "a number", 1)]],
        *[s.case(f"unknown header {name!r}", headers=lambda m, n=name, v=value: {**m, n: v})
          for name, value in [("foo", 1), ("reply_to", REPLY_QUEUE),
                              ("args", []), ("kwargs", {}), ("callbacks", []), ("chord", None),
                              ("countdown", 10), ("dbaas_auth2", {}), ("Task", HB), ("", 1),
                              ("t\u00e2sk", HB)]],
        # Huge: a limit on the body alone is no limit (headers are not in the MAC).
        s.case("'argsrepr' of 120 KB", headers=lambda m: {**m, "argsrepr": "x" * 120_000}),
        s.case("'x-junk' of 120 KB", headers=lambda m: {**m, "x-junk": "x" * 120_000}),
        s.case("'x-junk' of 4 MB", headers=lambda m: {**m, "x-junk": "x" * 4_000_000},
               unpublishable=RABBIT),  # over RabbitMQ's frame_max: the broker closes the connection
        s.case("'stamps' with 5,000 keys", headers=lambda m: {**m, "stamps": {f"k{i}": i for i in range(5_000)}}),
        s.case("3,000 x- headers", headers=lambda m: {**m, **{f"x-h{i}": i for i in range(3_000)}}),
        # RabbitMQ closes the channel over an infinite double (INTERNAL_ERROR).
        s.case("'timelimit' is infinite", headers=lambda m: {**m, "timelimit": [float("inf"), None]},
               unpublishable=RABBIT),
        # Broker-style x- headers with nested junk.
        s.case("x- header nested 13 levels", headers=lambda m: {**m, "x-death": nested_list(13)}),
        s.case("x- header nested 200 levels", headers=lambda m: {**m, "x-death": nested_dict(200)}),
        s.case("x-death of junk (stale heartbeat)", args=stale, expect="no effect", needs_db=True,
               headers=lambda m: {**m, "x-death": [{"count": "many", "reason": ["x", {"y": [1, None]}],
                                                     "queue": 5, "exchange": None}]}),
        s.case("x-delivery-count a string (stale heartbeat)", args=stale, expect="no effect", needs_db=True,
               headers=lambda m: {**m, "x-delivery-count": "many", "x-first-death-queue": {"q": []}}),
    ]
    check(s.runner.run("headers", cases))


# --- depth: arguments, kwargs, embed and header tables nested thousands of levels


def test_depth(system):
    s, a = system, system.a.instance_id
    bogus = {"v": 1, "principal": signing.instance_principal(a), "gen": 1, "mac": ZEROS}
    unsigned = lambda m: {**m, wire.AUTH_HEADER: bogus}  # noqa: E731  (a MAC cannot be made over these)
    embed = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
    cases = []
    for depth in (13, 500):  # a guest can sign these
        cases.append(s.case(f"args nested {depth} (signed)", args=[a, nested_list(depth), time.time()]))
        cases.append(s.case(f"payload nested {depth} (signed)", args=[a, nested_dict(depth), time.time()]))
        cases.append(s.case(f"kwargs nested {depth} (signed)", task=UB,
                            args=[a, s.backup_a, time.time()], kwargs={"state": nested_dict(depth)}))
    for depth in (5_000, 30_000):
        cases += [
            s.case(f"args nested {depth}", headers=unsigned,
                   body=f'[[{json.dumps(a)}, {deep_json(depth)}, 1.0], {{}}, {embed}]'.encode()),
            s.case(f"kwargs nested {depth}", headers=unsigned,
                   body=f'[[], {{"payload": {deep_object(depth)}}}, {embed}]'.encode()),
            s.case(f"embed nested {depth}", headers=unsigned,
                   body=f'[[], {{}}, {{"callbacks": {deep_json(depth)}}}]'.encode()),
            s.case(f"the whole body nested {depth}", headers=unsigned, body=deep_json(depth).encode()),
        ]
    cases += [
        s.case("header 'stamps' nested 13", headers=lambda m: {**m, "stamps": {"s": nested_dict(12)}}),
        s.case("header 'dbaas_auth' nested 13", headers=lambda m: {**m, wire.AUTH_HEADER: {
            **m[wire.AUTH_HEADER], "x": nested_dict(12)}}),
        # kombu cannot even encode these (JSON on the embedded broker, py-amqp's tables
        # on RabbitMQ): asserted; the same reaches RabbitMQ as raw frames below, and the
        # embedded broker as a file.
        s.case("header nested 3,000 (through kombu)", headers=lambda m: {**m, "x-deep": nested_dict(3_000)},
               unpublishable=BOTH),
    ]
    good = s.signed_headers()
    table = [(k, v) for k, v in good.items() if v is not None]
    for depth, kind in ((3_000, "F"), (15_000, "F"), (3_000, "A"), (100_000, "F")):
        headers = amqp_table(table + [("x-deep", deep_table_value(depth, kind))])
        cases.append(s.raw(f"AMQP header {'table' if kind == 'F' else 'array'} nested {depth:,}",
                           body_of(heartbeat_args(a)), basic_properties(headers=headers),
                           unpublishable=RABBIT if depth > 20_000 or kind == "A" else ()))
    auth_deep = amqp_table([(k, v) for k, v in good.items() if v is not None and k != wire.AUTH_HEADER]
                           + [(wire.AUTH_HEADER, deep_table_value(3_000))])
    cases.append(s.raw("AMQP 'dbaas_auth' nested 3,000", body_of(heartbeat_args(a)),
                       basic_properties(headers=auth_deep)))
    payload = virtual_payload(body_of(heartbeat_args(a)), good, GUESTS_QUEUE)
    deep_headers = json.dumps(payload).replace('"headers": {', '"headers": {"x-deep": ' + "[" * 100_000 + "]" * 100_000 + ", ", 1)
    cases += [
        s.file("file: headers nested 100,000", deep_headers.encode()),
        s.file("file: the whole file nested 100,000", deep_json(100_000).encode()),
    ]
    check(s.runner.run("depth", cases))


# --- encoding: content types and encodings other than JSON/UTF-8, bad UTF-8, non-finite
# and huge numbers


def test_encoding(system):
    s, a = system, system.a.instance_id
    args = heartbeat_args(a)  # what the cases below are signed over (a valid body, re-encoded)
    valid_body = body_of(args)

    class Exploit:
        def __reduce__(self):
            return (open, (PWNED, "w"))
    pickled = pickle.dumps(((args, {}, {}), Exploit()))
    bogus = lambda m: {**m, wire.AUTH_HEADER: {**m[wire.AUTH_HEADER], "mac": ZEROS}}  # noqa: E731
    cases = [
        s.case("pickle (with a payload that writes a file)", body=pickled,
               content_type="application/x-python-serialize", content_encoding="binary"),
        s.case("YAML with a python object tag", body=f"!!python/object/apply:os.system ['touch {PWNED}']".encode(),
               content_type="application/x-yaml", content_encoding="utf-8"),
        s.case("msgpack", body=b"\x93\x93\xa1a\x80\xc0\x80\x80", content_type="application/x-msgpack",
               content_encoding="binary"),
        s.case("text/plain (a valid body)", args=args, body=valid_body, content_type="text/plain"),
        s.case("application/json; charset=utf-8", args=args, body=valid_body, content_type="application/json; charset=utf-8"),
        s.case("APPLICATION/JSON", args=args, body=valid_body, content_type="APPLICATION/JSON"),
        s.case("a 200-character content type", args=args, body=valid_body, content_type="application/json" + "x" * 200,
               unpublishable=RABBIT),  # an AMQP short string holds 255 bytes
        s.case("content encoding 'binary'", args=args, body=valid_body, content_encoding="binary"),
        s.case("content encoding 'base64'", args=args, body=base64.b64encode(valid_body), content_encoding="base64"),
        s.case("content encoding 'gzip'", args=args, body=gzip.compress(valid_body), content_encoding="gzip"),
        s.case("content encoding 'utf-16'", args=args, body=valid_body.decode().encode("utf-16"), content_encoding="utf-16"),
        s.case("content encoding 'latin-1'", args=args, body=valid_body, content_encoding="latin-1"),
        s.case("compression header (zlib body)", args=args, body=zlib.compress(valid_body),
               headers=lambda m: {**m, "compression": "application/x-gzip"}),
        s.case("compression header, body not compressed", args=args, body=valid_body,
               headers=lambda m: {**m, "compression": "application/x-gzip"}),
        s.case("compression header 'application/x-bz2', junk body", body=b"junk",
               headers=lambda m: {**m, "compression": "application/x-bz2"}),
        s.case("compression header of an unknown scheme", args=args, body=valid_body,
               headers=lambda m: {**m, "compression": "application/x-no-such-thing"}),
        s.case("compression header a number", args=args, body=valid_body, headers=lambda m: {**m, "compression": 5}),
        compression_bomb(s),
        s.case("UTF-16 body claiming utf-8", args=args, body=valid_body.decode().encode("utf-16")),
        s.case("UTF-16-BE body claiming utf-8", args=args, body=valid_body.decode().encode("utf-16-be")),
        s.case("UTF-32 body claiming utf-8", args=args, body=valid_body.decode().encode("utf-32")),
        s.case("UTF-8 with a byte-order mark (stale heartbeat)", args=heartbeat_args(a, sent=1.0),
               body=b"\xef\xbb\xbf" + body_of(heartbeat_args(a, sent=1.0)), expect="no effect", needs_db=True),
        s.case("invalid UTF-8 in a string", body=b'[["\xff\xfe", {}, 1.0], {}, {}]'),
        s.case("overlong UTF-8", body=b'[["\xc0\xaf", {}, 1.0], {}, {}]'),
        s.case("UTF-8-encoded surrogate", body=b'[["\xed\xa0\x80", {}, 1.0], {}, {}]'),
        s.case("NaN", headers=bogus, body=f'[["{a}", {{}}, NaN], {{}}, {{}}]'.encode()),
        s.case("Infinity", headers=bogus, body=f'[["{a}", {{}}, Infinity], {{}}, {{}}]'.encode()),
        s.case("-Infinity", headers=bogus, body=f'[["{a}", {{}}, -Infinity], {{}}, {{}}]'.encode()),
        s.case("1e400 (a float that overflows)", headers=bogus, body=f'[["{a}", {{}}, 1e400], {{}}, {{}}]'.encode()),
        s.case("an integer of 5,000 digits", headers=bogus,
               body=f'[["{a}", {{}}, {"9" * 5000}], {{}}, {{}}]'.encode()),
        s.case("'sent' an integer of 4,000 digits (signed)", args=[a, {}, 10 ** 4000], needs_db=True),
        s.case("'size' an integer of 4,000 digits (signed)", task=UB, args=[a, s.backup_a, time.time()],
               kwargs={"state": "BUILDING", "size": 10 ** 4000}, needs_db=True),
        s.case("'gen' an integer of 40 digits", headers=lambda m: {**m, wire.AUTH_HEADER: {
            **m[wire.AUTH_HEADER], "gen": 10 ** 40}}, unpublishable=RABBIT),  # no AMQP integer holds it
        s.case("a lone surrogate in fail_reason (signed)", task=UB, args=[a, s.backup_a, NOW],
               kwargs={"state": "BUILDING", "fail_reason": "\ud800"}, needs_db=True),
        s.case("a lone surrogate in guest_agent_version (signed)", needs_db=True,
               args=[a, {"service_status": "crashed", "guest_agent_version": "\udfff"}, NOW]),
    ]
    check(s.runner.run("encoding", cases))
    assert not os.path.exists(PWNED), "a hostile payload ran in the conductor"


def compression_bomb(s, megabytes=256):
    """A zlib body of a few hundred kB that inflates to ``megabytes`` MB of JSON: the
    size limit is worth nothing if the body is inflated before it is checked."""
    body = zlib.compress(b"[" + b" " * (megabytes << 20) + b"[], {}, {}]", 9)
    peak = {}

    def send():
        peak["before"] = peak_rss_kb(s.process.current.process.pid)
        s.to_guests(body=body, headers=lambda m: {**m, "compression": "application/x-gzip"})

    def after():
        grown = (peak_rss_kb(s.process.current.process.pid) - peak["before"]) / 1024
        if grown > 64:
            return (f"a {len(body) / 1024:.0f} kB message raised the conductor's peak RSS by {grown:.0f} MB "
                    f"(it was inflated before any check)")
    return Case(f"compression bomb ({len(body) // 1024} kB inflating to {megabytes} MB)", send, after=after)


# --- canvas and embed: callbacks, errbacks, chains, chords, validly signed by A


def test_canvas(system):
    s, a, b = system, system.a.instance_id, system.b.instance_id
    service_auth = {"v": 1, "principal": "service", "mac": ZEROS}

    def sig(task, args, queue_name, kwargs=None):
        return {"task": task, "args": args, "kwargs": kwargs or {}, "subtask_type": None,
                "immutable": True, "chord_size": None,
                "options": {"queue": queue_name, "exchange": queue_name, "routing_key": queue_name,
                            "headers": {wire.AUTH_HEADER: service_auth}, "reply_to": REPLY_QUEUE}}
    crud = sig("conductor.instance_update", [b], CONTROL_QUEUE, {"task_status": "DELETING"})
    delete_b = sig("taskmanager.delete_instance", [b], TASKMANAGER_QUEUE)
    to_sink = sig("conductor.heartbeat", [b, {"service_status": "shutdown"}, time.time()], SINK_QUEUE)
    backup = dict(task=UB, args=[a, s.backup_a, time.time()], kwargs={"state": "BUILDING"})
    embeds = {
        "link callback: CRUD on B": {"callbacks": [crud]},
        "link callback: taskmanager deletes B": {"callbacks": [delete_b]},
        "link callback to another queue": {"callbacks": [to_sink]},
        "errback": {"errbacks": [delete_b]},
        "chain": {"chain": [crud, delete_b]},
        "chord": {"chord": {**sig("celery.chord_unlock", [], CONTROL_QUEUE), "body": delete_b}},
        "callbacks as a mapping": {"callbacks": crud},
        "callbacks as a string": {"callbacks": "taskmanager.delete_instance"},
        "unknown embed key 'group'": {"group": [crud]},
        "unknown embed key 'link'": {"link": [crud]},
        "every kind at once": {"callbacks": [crud], "errbacks": [delete_b], "chain": [to_sink],
                               "chord": delete_b},
    }
    cases = []
    for name, embed in embeds.items():
        full = {"callbacks": None, "errbacks": None, "chain": None, "chord": None, **embed}
        for label, message in (("update_backup", backup),
                               ("heartbeat", dict(args=heartbeat_args(a)))):
            args, kwargs = message.get("args"), message.get("kwargs") or {}
            cases.append(s.case(f"{name} ({label})", body=json.dumps([args, kwargs, full]).encode(),
                                **{k: v for k, v in message.items()}))
    cases += [
        s.case("group header", headers=lambda m: {**m, "group": str(uuid.uuid4()), "group_index": 0}, **backup),
        s.case("group_index header", headers=lambda m: {**m, "group_index": 0}, **backup),
    ]
    check(s.runner.run("canvas", cases))


# --- ETA, countdown, expires, retries, reply-to: validly signed


def test_eta_and_delivery_options(system):
    s, a = system, system.a.instance_id
    now = datetime.now(timezone.utc)
    year = (now + timedelta(days=365)).isoformat()
    backup = dict(task=UB, args=[a, s.backup_a, time.time()], kwargs={"state": "BUILDING"})
    stale = heartbeat_args(a, sent=1.0)
    cases = []
    for label, message in (("heartbeat", {}), ("update_backup", backup)):
        cases += [
            s.case(f"ETA a year ahead ({label})", headers=lambda m: {**m, "eta": year}, **message),
            s.case(f"ETA in the past ({label})", headers=lambda m: {**m, "eta": (now - timedelta(days=1)).isoformat()}, **message),
            s.case(f"ETA as a number ({label})", headers=lambda m: {**m, "eta": time.time() + 3600}, **message),
            s.case(f"expires in an hour ({label})", headers=lambda m: {**m, "expires": (now + timedelta(hours=1)).isoformat()}, **message),
            s.case(f"expired ({label})", headers=lambda m: {**m, "expires": (now - timedelta(hours=1)).isoformat()}, **message),
            s.case(f"retries 1 ({label})", headers=lambda m: {**m, "retries": 1}, **message),
            s.case(f"retries -1 ({label})", headers=lambda m: {**m, "retries": -1}, **message),
            s.case(f"retries 1,000,000 ({label})", headers=lambda m: {**m, "retries": 10 ** 6}, **message),
            s.case(f"reply_to a queue of the test ({label})", reply_to=REPLY_QUEUE,
                   correlation_id=str(uuid.uuid4()), **message),
            s.case(f"reply_to the taskmanager's queue ({label})", reply_to=TASKMANAGER_QUEUE, **message),
            s.case(f"reply_to with ignore_result false ({label})", reply_to=REPLY_QUEUE,
                   headers=lambda m: {**m, "ignore_result": False}, **message),
        ]
    cases += [
        # Broker-level options are the broker's business: taken or not, nothing changes.
        s.case("AMQP expiration (stale heartbeat)", args=stale, expiration=60, expect="no effect", needs_db=True),
        s.case("AMQP priority 255 (stale heartbeat)", args=stale, priority=255, expect="no effect", needs_db=True),
    ]

    def held_by_eta(count, signed):
        def send():
            for _ in range(count):
                s.to_guests(**backup, headers=lambda m: {**(m if signed else without(m, wire.AUTH_HEADER)),
                                                          "eta": year})
        return Case(f"{count:,} {'signed' if signed else 'unsigned'} update_backup with an ETA a year "
                    f"ahead (issue 6: these were held)", send, count=count)
    cases += [held_by_eta(1_000, signed=False), held_by_eta(1_000, signed=True)]
    check(s.runner.run("ETA, expires, retries, reply-to", cases))


# --- signature: unsigned, bad MAC, unknown principal, another's key, generation, forged
# service, replay


def test_signature(system):
    s, a, b, c = system, system.a.instance_id, system.b.instance_id, system.c.instance_id
    args = heartbeat_args(a)

    def auth(**changes):
        header = s.a.auth(HB, args)
        for key, value in changes.items():
            if value is ...:
                header.pop(key, None)
            else:
                header[key] = value
        return lambda m: {**m, wire.AUTH_HEADER: header}

    def keyed(key, principal, generation=None, task=HB, args_=args, kwargs=None):
        return lambda m: {**m, wire.AUTH_HEADER: signing.auth_header(principal, key, task, args_, kwargs or {},
                                                                     generation=generation)}
    mac = s.a.auth(HB, args)["mac"]
    gen2 = signing.guest_secret(SERVICE_KEY, a, 2)
    cases = [
        s.case("no dbaas_auth", args=args, headers=lambda m: without(m, wire.AUTH_HEADER)),
        *[s.case(f"dbaas_auth is {label}", args=args, headers=lambda m, v=value: {**m, wire.AUTH_HEADER: v})
          for label, value in [("empty", {}), ("a string", "instance:x"), ("a list", [mac]), ("null", None),
                               ("a number", 1)]],
        s.case("no version", args=args, headers=auth(v=...)),
        s.case("version 2", args=args, headers=auth(v=2)),
        s.case("version '1'", args=args, headers=auth(v="1")),
        s.case("no principal", args=args, headers=auth(principal=...)),
        *[s.case(f"principal {label}", args=args, headers=auth(principal=value))
          for label, value in [("a number", 123), ("empty", ""), ("'admin'", "admin"), ("'Service'", "Service"),
                               ("'instance:' alone", "instance:"), ("with a NUL", f"instance:{a}\x00"),
                               ("of 10,000 characters", "instance:" + "a" * 10_000),
                               ("'instance:../'", "instance:../"), ("B's (A's MAC)", f"instance:{b}")]],
        s.case("A's principal, B's key", args=args, headers=keyed(s.b.secret, f"instance:{a}", 1)),
        s.case("B's principal and key, A's instance_id", args=args, headers=keyed(s.b.secret, f"instance:{b}", 1)),
        s.case("service principal, A's key (forged service)", args=args, headers=keyed(s.a.secret, "service")),
        s.case("service principal, zero MAC", args=args, headers=auth(principal="service", gen=...)),
        s.case("service principal on a heartbeat, A's key", args=args, headers=auth(principal="service")),
        s.case("no MAC", args=args, headers=auth(mac=...)),
        *[s.case(f"MAC {label}", args=args, headers=auth(mac=value))
          for label, value in [("of zeros", ZEROS), ("of 63 characters", mac[:-1]), ("of 65 characters", mac + "0"),
                               ("in capitals", mac.upper()), ("a number", 5), ("a list", [mac]), ("null", None),
                               ("of 64 non-ASCII characters", "\u00e9" * 64),
                               ("of 32 two-byte characters", "\u00e9" * 32),
                               ("of 64 characters with one non-ASCII", mac[:-1] + "\u00e9")]],
        s.case("no generation", args=args, headers=auth(gen=...)),
        *[s.case(f"generation {label}", args=args, headers=auth(gen=value))
          for label, value in [("0", 0), ("-1", -1), ("'1'", "1"), ("1.0", 1.0), ("true", True),
                               ("2**31", 2 ** 31), ("null", None)]],
        s.case("generation 2, generation 1's MAC", args=args, headers=auth(gen=2)),
        s.case("generation 2, its own valid MAC (not live)", args=args, needs_db=True,
               headers=keyed(gen2, f"instance:{a}", 2)),
        s.case("A's valid MAC over B's instance_id", args=heartbeat_args(b)),
        s.case("A's valid MAC, instance_id B as a keyword", args=[],
               kwargs={"instance_id": b, "payload": {"service_status": "crashed"}, "sent": time.time()}),
        s.case("A's valid MAC, instance_id A and B", args=[a], needs_db=True,
               kwargs={"instance_id": b, "payload": {"service_status": "crashed"}, "sent": time.time()}),
        s.case("A's valid MAC on B's backup", task=UB, args=[a, s.backup_b, time.time()],
               kwargs={"state": "FAILED"}, needs_db=True),
        s.case("A's valid MAC on B's backup, naming B", task=UB, args=[b, s.backup_b, time.time()],
               kwargs={"state": "FAILED"}),
        s.case("deleted instance C's valid MAC", guest=s.c, args=heartbeat_args(c), needs_db=True),
        Case("replay of B's applied heartbeat (stale: discarded)",
             lambda: s.broker.publish(GUESTS_QUEUE, GUESTS_QUEUE, **s.b_message), expect="no effect",
             needs_db=True),
        Case("replay of B's heartbeat, principal A", lambda: s.broker.publish(
            GUESTS_QUEUE, GUESTS_QUEUE, **{**s.b_message, "headers": {**s.b_message["headers"], wire.AUTH_HEADER: {
                **s.b_message["headers"][wire.AUTH_HEADER], "principal": f"instance:{a}"}}})),
        Case("replay of B's heartbeat, status changed", lambda: s.broker.publish(
            GUESTS_QUEUE, GUESTS_QUEUE, **{**s.b_message, "body": s.b_message["body"].replace(b"running", b"crashed")})),
    ]
    check(s.runner.run("signature", cases))


# --- the wire: frames no kombu client sends (RabbitMQ), files no kombu producer writes
# (the embedded broker)


def test_wire(system):
    s, a = system, system.a.instance_id
    good = s.signed_headers()
    table = [(k, v) for k, v in good.items() if v is not None]
    body = body_of(heartbeat_args(a))
    raw = lambda name, **p: s.raw(name, body, basic_properties(**p))  # noqa: E731
    S = lambda data: Raw(b"S" + len(data).to_bytes(4, "big") + data)  # noqa: E731
    cases = [
        raw("no properties at all", content_type=None, content_encoding=None, headers=None, delivery_mode=None),
        raw("no content type", content_type=None, headers=amqp_table(table)),
        raw("content type not UTF-8", content_type=b"application/json\xff", headers=amqp_table(table)),
        raw("content encoding not UTF-8", content_encoding=b"utf-8\xff", headers=amqp_table(table)),
        raw("reply_to not UTF-8", headers=amqp_table(table), reply_to=b"\xff\xfe"),
        raw("correlation_id not UTF-8", headers=amqp_table(table), correlation_id=b"\xc3"),
        raw("header name not UTF-8", headers=amqp_table(table + [(b"\xff\xfe", 1)])),
        raw("x- header name not UTF-8", headers=amqp_table(table + [(b"x-\xff", 1)])),
        raw("'task' not UTF-8", headers=amqp_table([(k, v) for k, v in table if k != "task"] + [("task", S(b"conductor.\xff"))])),
        raw("'id' a byte array", headers=amqp_table([(k, v) for k, v in table if k != "id"]
                                                     + [("id", Raw(b"x\x00\x00\x00\x02id"))])),
        raw("'task' a timestamp", headers=amqp_table([(k, v) for k, v in table if k != "task"] + [("task", Raw(b"T" + bytes(8)))])),
        raw("'retries' a decimal", headers=amqp_table(table + [("retries", Raw(b"D\x02\x00\x00\x00\x00"))])),
        raw("'retries' a short int", headers=amqp_table(table + [("retries", Raw(b"s\x00\x00"))])),
        raw("'task' void", headers=amqp_table([(k, v) for k, v in table if k != "task"] + [("task", Raw(b"V"))])),
        raw("MAC a byte array", headers=amqp_table([(k, v) for k, v in table if k != wire.AUTH_HEADER] + [
            (wire.AUTH_HEADER, Raw(b"F" + amqp_table([("v", 1), ("principal", f"instance:{a}"), ("gen", 1),
                                                        ("mac", Raw(b"x" + (64).to_bytes(4, "big") + b"0" * 64))])))])),
        raw("MAC not UTF-8", headers=amqp_table([(k, v) for k, v in table if k != wire.AUTH_HEADER] + [
            (wire.AUTH_HEADER, Raw(b"F" + amqp_table([("v", 1), ("principal", f"instance:{a}"), ("gen", 1),
                                                        ("mac", S(b"\xff" * 64))])))])),
        s.raw("an unknown field type", body, basic_properties(headers=amqp_table(table + [("x-odd", Raw(b"Z"))])),
              unpublishable=RABBIT),
        s.raw("a header table longer than its frame", body,
              basic_properties(headers=b"\x00\x00\xff\xff" + amqp_table(table)[4:]), unpublishable=RABBIT),
    ]
    # The embedded broker: whoever may write its directory (every local process) may write
    # any file there.
    payload = virtual_payload(body, good, GUESTS_QUEUE)

    def with_properties(**changes):
        return json.dumps({**payload, "properties": {**payload["properties"], **changes}}).encode()
    cases += [
        s.file("file: not JSON", b"{not json"),
        s.file("file: a JSON list", b"[1, 2, 3]"),
        s.file("file: no properties", json.dumps(without(payload, "properties")).encode()),
        s.file("file: no delivery tag", json.dumps({**payload, "properties": without(payload["properties"], "delivery_tag")}).encode()),
        s.file("file: properties a string", json.dumps({**payload, "properties": "x"}).encode()),
        s.file("file: delivery tag a list", with_properties(delivery_tag=["x"]), expect="handled"),
        s.file("file: delivery tag a mapping", with_properties(delivery_tag={"x": 1}), expect="handled"),
        s.file("file: body not base64", json.dumps({**payload, "body": "%%% not base64 %%%"}).encode(), expect="handled"),
        s.file("file: unknown body encoding", with_properties(body_encoding="rot13"), expect="handled"),
        s.file("file: body a number", json.dumps({**payload, "body": 5, "properties": without(
            payload["properties"], "body_encoding") | {"delivery_tag": str(uuid.uuid4())}}).encode(), expect="handled"),
        s.file("file: delivery_info a string", with_properties(delivery_info="x"), expect="handled"),
        s.file("file: headers a list", json.dumps({**payload, "headers": [1]}).encode(), expect="handled"),
        s.file("file: headers null", json.dumps({**payload, "headers": None}).encode(), expect="handled"),
        s.file("file: content type a number", json.dumps({**payload, "content-type": 5}).encode(), expect="handled"),
        s.file("file: 8 MB of headers", json.dumps({**payload, "headers": {**good, "x-junk": "x" * (8 << 20)}}).encode(),
               expect="handled"),
    ]
    check(s.runner.run("wire", cases))


# --- the control queue: the same attacker, on the queue of the control plane's calls


CALL_SCRIPT = """
import sys
from dbaas.celery import app
from workers.conductor.api import ConductorAPI
assert ConductorAPI(app, timeout=20).instance_show(sys.argv[1])["id"] == sys.argv[1]
"""


def test_control_queue(system):
    s, a, b = system, system.a.instance_id, system.b.instance_id
    q = CONTROL_QUEUE

    def ctl(name, task="conductor.instance_update", args=None, kwargs=None, signer="A", **message):
        args = [b] if args is None else args
        kwargs = {"task_status": "DELETING"} if kwargs is None and task == "conductor.instance_update" else (kwargs or {})

        def send():
            built = s.a.message(task, args, kwargs)
            if signer is None:
                built["headers"] = without(built["headers"], wire.AUTH_HEADER)
            elif signer == "service-forged":
                built["headers"][wire.AUTH_HEADER] = signing.auth_header("service", s.a.secret, task, args, kwargs)
            for key, value in message.items():
                built[key] = value(built[key]) if callable(value) and key == "headers" else value
            s.broker.publish(q, q, **built)
        return Case(name, send)
    now = datetime.now(timezone.utc)
    bogus = {"v": 1, "principal": "service", "mac": ZEROS}
    cases = [
        ctl("guest-signed instance_update of B"),
        ctl("guest-signed instance_deleted of B", task="conductor.instance_deleted"),
        ctl("guest-signed instance_deleted of A itself", task="conductor.instance_deleted", args=[a]),
        ctl("guest-signed backup_deleted of B's backup", task="conductor.backup_deleted", args=[s.backup_b]),
        ctl("guest-signed backup_fail of B's backup", task="conductor.backup_fail", args=[s.backup_b, "x"]),
        ctl("guest-signed quota_update", task="conductor.quota_update", args=["default"], kwargs={"instances": 1000}),
        ctl("guest-signed sweep", task="conductor.sweep", args=[]),
        ctl("guest-signed instance_show of B with a reply address (a read of another's data)",
            task="conductor.instance_show", args=[b], reply_to=REPLY_QUEUE, correlation_id=str(uuid.uuid4())),
        ctl("guest-signed heartbeat on the control queue", task=HB, args=heartbeat_args(a)),
        ctl("a Celery builtin (celery.chord_unlock)", task="celery.chord_unlock", args=[]),
        ctl("unsigned instance_update of B", signer=None),
        ctl("service principal, zero MAC", headers=lambda m: {**m, wire.AUTH_HEADER: bogus}),
        ctl("service principal, A's key", signer="service-forged"),
        ctl("service principal, non-ASCII MAC", headers=lambda m: {**m, wire.AUTH_HEADER: {**bogus, "mac": "\u00e9" * 64}}),
        ctl("empty body", body=b""), ctl("not JSON", body=b"{not json"),
        ctl("two-element body", body=json.dumps([[b], {}]).encode()),
        ctl("an object body", body=b"{}"),
        ctl("'task' a list", headers=lambda m: {**m, "task": ["conductor.instance_update"]}),
        ctl("no 'id'", headers=lambda m: without(m, "id")),
        ctl("'timelimit' a string", headers=lambda m: {**m, "timelimit": "10"}),
        ctl("args nested 5,000", body=f'[[{deep_json(5_000)}], {{}}, {{}}]'.encode()),
        ctl("kwargs nested 13 (signed)", kwargs={"task_status": nested_dict(13)}),
        ctl("guest-signed, ETA a year ahead", headers=lambda m: {**m, "eta": (now + timedelta(days=365)).isoformat()}),
        ctl("service-forged, ETA a year ahead", signer="service-forged",
            headers=lambda m: {**m, "eta": (now + timedelta(days=365)).isoformat()}),
        ctl("guest-signed, expires", headers=lambda m: {**m, "expires": (now + timedelta(hours=1)).isoformat()}),
        ctl("guest-signed, callback deleting B", body=json.dumps([[b], {"task_status": "DELETING"}, {
            "callbacks": [{"task": "taskmanager.delete_instance", "args": [b], "kwargs": {},
                           "options": {"queue": TASKMANAGER_QUEUE}, "immutable": True}]}]).encode()),
        ctl("pickle", body=pickle.dumps([[b], {}, {}]), content_type="application/x-python-serialize",
            content_encoding="binary"),
        s.raw("AMQP header table nested 3,000", body_of([b], {"task_status": "DELETING"}), basic_properties(
            headers=amqp_table([(k, v) for k, v in s.signed_headers("conductor.instance_update", [b]).items()
                                if v is not None] + [("x-deep", deep_table_value(3_000))])), queue_name=q),
        s.raw("header name not UTF-8", body_of([b], {"task_status": "DELETING"}), basic_properties(
            headers=amqp_table([(k, v) for k, v in s.signed_headers("conductor.instance_update", [b]).items()
                                if v is not None] + [(b"\xff", 1)])), queue_name=q),
        s.file("file: delivery_info a string", json.dumps(virtual_payload(
            body_of([b], {"task_status": "DELETING"}), s.signed_headers("conductor.instance_update", [b]), q,
            delivery_info="x")).encode(), queue_name=q, expect="handled"),
    ]

    def valid():
        served = s.valid_heartbeat()
        call = subprocess.run([sys.executable, "-c", CALL_SCRIPT, a], cwd=ROOT, env=s.stack.client_env(),
                              capture_output=True, text=True, timeout=60)
        return lambda: served() and (call.returncode == 0 or pytest.fail(
            f"[{s.stack.kind}] a valid call on the control queue failed after the class: {call.stderr[-1500:]}"))
    runner = Runner(s.stack, s.broker, s.process, valid=valid)
    check(runner.run("control queue", cases))


# --- flood: 20,000 hostile messages of mixed kinds, valid heartbeats at the same time


FLOOD = 20_000
VALID_DURING_FLOOD = 300
# Issue 6 asks for >= 2,000 refusals/s per conductor; allowed here: the whole flood
# drained within this many seconds of its first message (>= 167 messages/s), so that a
# shared 2-core machine does not make the test flaky and a broken drain ends the test.
FLOOD_DEADLINE = 120
RSS_GROWTH_LIMIT_MB = 150


def flood_kinds(s) -> list[dict]:
    """Hostile messages of mixed kinds (kombu publish arguments), sent round robin."""
    a, b = s.a.instance_id, s.b.instance_id
    now = time.time()
    args = heartbeat_args(a)
    base = s.a.message(HB, args)
    auth = base["headers"][wire.AUTH_HEADER]

    def with_headers(**changes):
        return {**base, "headers": {**base["headers"], **changes}}
    callbacks = s.a.message(UB, [a, s.backup_a, now], {"state": "BUILDING"})
    callbacks["body"] = json.dumps([[a, s.backup_a, now], {"state": "BUILDING"}, {
        "callbacks": [{"task": "taskmanager.delete_instance", "args": [b], "kwargs": {},
                       "options": {"queue": TASKMANAGER_QUEUE}}], "errbacks": None, "chain": None,
        "chord": None}]).encode()
    return [
        {**base, "headers": without(base["headers"], wire.AUTH_HEADER)},                 # unsigned
        with_headers(**{wire.AUTH_HEADER: {**auth, "mac": ZEROS}}),                        # bad MAC
        with_headers(**{wire.AUTH_HEADER: signing.auth_header(                             # unknown principal
            f"instance:{uuid.uuid4()}", s.a.secret, HB, args, {}, generation=1)}),
        with_headers(**{wire.AUTH_HEADER: s.b.auth(HB, args)}),                            # another's key
        with_headers(**{wire.AUTH_HEADER: signing.auth_header("service", s.a.secret, HB, args, {})}),
        with_headers(eta=(datetime.now(timezone.utc) + timedelta(days=365)).isoformat()),  # ETA
        callbacks,                                                                          # a callback
        {**base, "body": b"{not json"}, {**base, "body": b"[1, 2]"},
        {**base, "body": deep_json(20_000).encode()},
        {**base, "body": json.dumps([args, {"pad": "x" * 70_000}, {}]).encode()},           # too big
        {**base, "content_type": "application/x-python-serialize", "content_encoding": "binary"},
        with_headers(task=["x"]), {**base, "headers": without(base["headers"], "id")},
        s.a.message(UB, [a, s.backup_b, now], {"state": "FAILED"}),  # valid MAC, B's backup (a DB read)
        s.a.message(HB, [a, {"service_status": "potato"}, now]),      # valid MAC, bad payload (a DB read)
    ]


@pytest.mark.fault
def test_flood(system):
    """Valid heartbeats published while 20,000 hostile messages are queued are applied
    within the flood's drain time; every hostile one is refused; the conductor's memory
    stays bounded; nothing changes but the valid heartbeats' instances."""
    s = system
    s.runner.ensure_running()
    guests = [Guest(i, secret) for i, secret in make_instances(VALID_DURING_FLOOD).items()]
    hostile = flood_kinds(s)
    s.broker.publishes_by_others()
    s.broker.stop_firehose()  # the tracer would double RabbitMQ's work: queues are checked instead
    pid = s.process.current.process.pid
    rss_before, log_before = rss_kb(pid), len(s.process.log())
    before = {row.get("id") or repr(row): row for row in snapshot()}
    sent_valid: dict[str, float] = {}

    def publish_valid():
        publisher = Broker(s.stack)
        try:
            for guest in guests:
                time.sleep(0.01)
                sent = time.time()
                sent_valid[guest.instance_id] = sent
                publisher.publish(GUESTS_QUEUE, GUESTS_QUEUE, sync=False,
                                  **guest.message(HB, heartbeat_args(guest.instance_id, "running", sent)))
        finally:
            publisher.close()

    peak, stop = [rss_before], []

    def sample():
        while not stop:
            if s.process.alive():
                peak[0] = max(peak[0], rss_kb(pid))
            time.sleep(0.2)
    sampler = run_in_thread(sample)
    started = time.monotonic()
    valid_thread = None
    failures = []
    try:
        for n in range(FLOOD):
            s.broker.publish(GUESTS_QUEUE, GUESTS_QUEUE, sync=False, **hostile[n % len(hostile)])
            if n == FLOOD // 10:
                valid_thread = run_in_thread(publish_valid)  # while the flood is queued and drained
        published = time.monotonic() - started
        valid_thread.join(timeout=120)
        try:
            wait_until(lambda: not s.broker.nonempty() or not s.process.alive(),
                       timeout=max(5, FLOOD_DEADLINE - (time.monotonic() - started)), interval=0.5,
                       message="the flood drained")
        except AssertionError:
            left = s.broker.nonempty()
            failures.append(f"not drained {FLOOD_DEADLINE}s after it began (>= {FLOOD / FLOOD_DEADLINE:.0f} "
                            f"messages/s expected; issue 6 asks for 2,000/s): still queued {left}")
        drain = time.monotonic() - started
    finally:
        stop.append(True)
        sampler.join()
    if not s.process.alive():
        failures.append(f"the conductor died in the flood: {s.process.log()[-2000:]}")
    time.sleep(1)
    applied = {i: watermark("heartbeat", i) for i in sent_valid}
    missing = [i for i, sent in sent_valid.items() if applied[i] != sent]
    refusals = len(REFUSAL.findall(s.process.log()[log_before:]))
    rss_after = rss_kb(pid) if s.process.alive() else 0
    print(f"\n{s.stack.kind}: {FLOOD:,} hostile messages of {len(hostile)} kinds queued in {published:.1f}s, "
          f"drained in {drain:.1f}s ({refusals / drain:,.0f} refusals/s); "
          f"{len(sent_valid) - len(missing)}/{len(sent_valid)} valid heartbeats applied; {refusals:,} refusals "
          f"logged; conductor RSS {rss_before / 1024:.0f} MB -> peak {peak[0] / 1024:.0f} -> {rss_after / 1024:.0f}")
    if missing:
        failures.append(f"{len(missing)} of {len(sent_valid)} valid heartbeats published during the flood were "
                        f"not applied by the time it drained")
    if refusals != FLOOD:
        failures.append(f"{refusals:,} refusals logged for {FLOOD:,} hostile messages")
    if peak[0] - rss_before > RSS_GROWTH_LIMIT_MB * 1024:
        failures.append(f"the conductor's RSS grew by {(peak[0] - rss_before) / 1024:.0f} MB during the flood")
    after = {row.get("id") or repr(row): row for row in snapshot()}
    changed = [key for key, row in after.items()
               if before.get(key) != row and key not in sent_valid and row.get("key") not in sent_valid]
    if changed:
        failures.append(f"rows changed by the flood: {changed[:5]}")
    s.broker.purge(GUESTS_QUEUE)  # whatever is left of a flood that did not drain
    s.broker.start_firehose()
    record_failures([f"[{s.stack.kind}] flood: {failure}" for failure in failures])
    if failures:
        pytest.fail(f"[{s.stack.kind}] flood: " + "\n".join(failures), pytrace=False)
