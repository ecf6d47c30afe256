"""Hostile messages for the guests' queue, one builder per kind of refusal.

Each kind rotates through a few variants (message index modulo their number) so that one
kind covers its class, not one byte pattern. Every builder returns kombu publish kwargs.
What dbaas/intake.py (on arrival) and workers/conductor/consumer.py (after the
credential lookup) refuse them for is listed in ``EXPECTED``: the bench checks each
refusal's log line against it.
"""

import json
import pickle
import re
import secrets
import time
import uuid

from dbaas import signing, wire
from workers.guestagent.client import build_message

HB = wire.HEARTBEAT_TASK
AUTH = wire.AUTH_HEADER
PAYLOAD = {"service_status": "running", "guest_agent_version": "1.0"}


class Context:
    """Instances the hostile guests hold credentials of: live ones, and deleted ones whose
    guests still send validly signed messages."""

    def __init__(self, live: dict[str, str], deleted: dict[str, str], oversized_bytes: int,
                 broker_user: str):
        self.broker_user = broker_user
        self.live = list(live.items())
        self.deleted = list(deleted.items())
        self.oversized_bytes = oversized_bytes

    def guest(self, i: int) -> tuple[str, str]:
        return self.live[i % len(self.live)]

    def other(self, i: int) -> tuple[str, str]:
        return self.live[(i + 1) % len(self.live)]


def _signed(ctx, i, args=None, kwargs=None, task=HB, secret=None):
    instance_id, own = ctx.guest(i)
    args = args if args is not None else [instance_id, dict(PAYLOAD), time.time()]
    return build_message(instance_id, secret or own, 1, task, args, kwargs)


def _with_headers(message, **changes):
    headers = dict(message["headers"])
    for name, value in changes.items():
        if value is _DROP:
            headers.pop(name, None)
        else:
            headers[name] = value
    return {**message, "headers": headers}


_DROP = object()


def _nested(levels: int):
    value = {"deep": "end"}
    for _ in range(levels):
        value = {"deep": value}
    return value


# ----------------------------------------------------------------------------- kinds

def unsigned(ctx, i):
    return _with_headers(_signed(ctx, i), **{AUTH: _DROP})


def bad_signature(ctx, i):
    variant = i % 4
    if variant == 0:                                   # a made-up key
        return _signed(ctx, i, secret=secrets.token_hex(32))
    if variant == 1:                                   # another guest's key, this guest's name
        return _signed(ctx, i, secret=ctx.other(i)[1])
    if variant == 2:                                   # body changed after signing
        message = _signed(ctx, i)
        args, kwargs, embed = json.loads(message["body"])
        args[1]["service_status"] = "shutdown"
        return {**message, "body": json.dumps([args, kwargs, embed]).encode()}
    message = _signed(ctx, i)                          # a MAC of zeros
    return _with_headers(message, **{AUTH: {**message["headers"][AUTH], "mac": "0" * 64}})


def unknown_principal(ctx, i):
    instance_id, _ = ctx.guest(i)
    args = [instance_id, dict(PAYLOAD), time.time()]
    if i % 2:                                          # not "service", not "instance:<id>"
        name = ("admin", "root", "conductor", "instance", "taskmanager")[i // 2 % 5]
        auth = signing.auth_header(name, secrets.token_hex(32), HB, args, {}, generation=1)
    else:                                              # an instance that does not exist
        stranger = str(uuid.uuid4())
        args[0] = stranger
        auth = signing.auth_header(signing.instance_principal(stranger), secrets.token_hex(32),
                                   HB, args, {}, generation=1)
    message = build_message(instance_id, ctx.guest(i)[1], 1, HB, args)
    return _with_headers(message, **{AUTH: auth})


_BODIES = [b"{not json", b"", b"42", b"[1, 2]", b'{"args": []}', b"\xff\xfe\x00garbage",
           b'[[], {}, {}, "extra"]', b'["args", {}, {}]', b'NaN']


def malformed_body(ctx, i):
    return {**_signed(ctx, i), "body": _BODIES[i % len(_BODIES)]}


def bad_headers(ctx, i):
    message = _signed(ctx, i)
    variant = i % 10
    if variant == 0:
        return {**message, "body": pickle.dumps(([], {}, {})),
                "content_type": "application/x-python-serialize", "content_encoding": "binary"}
    if variant == 1:
        return {**message, "content_type": "application/x-yaml"}
    if variant == 2:
        return {**message, "content_encoding": "utf-16"}
    if variant == 3:
        return _with_headers(message, task=[HB])
    if variant == 4:
        return _with_headers(message, id=_DROP)
    if variant == 5:
        return _with_headers(message, timelimit="1")
    if variant == 6:
        return _with_headers(message, link="conductor.instance_update")
    if variant == 7:
        return _with_headers(message, retries=3)
    if variant == 8:
        return {**message, "reply_to": "attacker-replies"}
    return _with_headers(message, expires="2030-01-01T00:00:00+00:00")


def oversized(ctx, i):
    instance_id, _ = ctx.guest(i)
    return _signed(ctx, i, args=[instance_id, {**PAYLOAD, "junk": "x" * ctx.oversized_bytes}, time.time()])


def eta(ctx, i):
    when = time.time() + (365 * 86400 if i % 2 else 60)
    return _with_headers(_signed(ctx, i), eta=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(when)))


_EMBEDS = [
    {"callbacks": [{"task": "conductor.instance_update", "args": [], "kwargs": {}}]},
    {"errbacks": [{"task": "taskmanager.delete_instance", "args": [], "kwargs": {}}]},
    {"chain": [{"task": "conductor.instance_update", "args": [], "kwargs": {}}]},
    {"chord": {"task": "conductor.backup_create", "args": [], "kwargs": {}}},
    {"group": "x"},
]


def embed(ctx, i):
    message = _signed(ctx, i)
    args, kwargs, _embed = json.loads(message["body"])
    body = {"callbacks": None, "errbacks": None, "chain": None, "chord": None, **_EMBEDS[i % len(_EMBEDS)]}
    return {**message, "body": json.dumps([args, kwargs, body]).encode()}


def deep_nesting(ctx, i):
    instance_id, _ = ctx.guest(i)
    variant = i % 3
    if variant == 0:   # valid JSON just past the limit, validly signed
        return _signed(ctx, i, args=[instance_id, {**PAYLOAD, "x": _nested(11)}, time.time()])
    if variant == 1:   # 5,000 levels: the decoder's own recursion limit
        return {**_signed(ctx, i), "body": b"[" * 5000 + b"]" * 5000}
    message = _signed(ctx, i)
    return _with_headers(message, **{AUTH: {**message["headers"][AUTH], "x": _nested(20)}})


def revoked(ctx, i):
    """A deleted instance's guest, still holding its (valid) key: refused after the
    (cached) credential lookup, not on arrival."""
    instance_id, secret = ctx.deleted[i % len(ctx.deleted)]
    return build_message(instance_id, secret, 1, HB, [instance_id, dict(PAYLOAD), time.time()])


def no_broker_user(ctx, i):
    """Validly signed, but not published by the instance's own broker user: without a
    ``user_id``, or with the publishing connection's own user (RabbitMQ checks user_id
    against the connection; the conductor wants ``instance-<id>``). Measured with
    DBAAS_REQUIRE_GUEST_USER_ID=true, the product's default."""
    message = _signed(ctx, i)
    return message if i % 2 else {**message, "user_id": ctx.broker_user}


KINDS = {
    "unsigned": unsigned,
    "bad-signature": bad_signature,
    "unknown-principal": unknown_principal,
    "malformed-body": malformed_body,
    "bad-headers": bad_headers,
    "oversized": oversized,
    "eta": eta,
    "embed": embed,
    "deep-nesting": deep_nesting,
    "revoked": revoked,
    "no-broker-user": no_broker_user,
}
# Kinds measured with a conductor of their own, started with these settings.
KIND_ENV = {"no-broker-user": {"DBAAS_REQUIRE_GUEST_USER_ID": "true"}}

# Substrings of the refusal reasons each kind may produce.
EXPECTED = {
    "unsigned": ["no 'dbaas_auth' header"],
    "bad-signature": ["signature does not verify"],
    "unknown-principal": ["unknown principal", "signature does not verify"],
    "malformed-body": ["undecodable body", "is not [args, kwargs, embed]", "is not [list, mapping, mapping]"],
    "bad-headers": ["content type", "content encoding", "has the wrong type", "no 'id' header",
                    "unexpected header", "retries > 0", "may not expire or ask for a reply"],
    "oversized": ["exceeds the"],
    "eta": ["header 'eta' has the wrong type"],
    "embed": ["callbacks, errbacks, chains and chords are refused"],
    "deep-nesting": ["nests deeper than", "nest deeper than", "RecursionError"],
    "revoked": ["no live credentials"],
    "no-broker-user": ["does not vouch for the sender"],
}


def reason_of(line: str) -> str:
    """The reason of a refusal log line, with ids and numbers masked, so that lines of one
    class count as one."""
    reason = line.split("on the guests' queue: ", 1)[-1].strip()
    reason = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", reason)
    reason = re.sub(r"\d+", "N", reason)
    return reason[:90]
