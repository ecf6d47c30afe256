"""What every consumer checks before anything else sees a message: its shape, its size, its
nesting, who signed it and what that sender may ask for.

Any process that consumes a queue others can write to runs these checks first, in the
thread that receives the message — the conductor (guests' queue and control queue), the
taskmanager and guests (their command queues). A message that fails is refused whole: no
decoder, task machinery or pool process ever sees it, and nothing it carries (callbacks,
an ETA, a reply address) is acted on.

Reads no database: a signature is checked against keys derived from the service key
(dbaas.signing). Standard library, kombu and amqp only: guests import it.
"""

import json
import logging
import math
import re
from dataclasses import dataclass

from amqp import serialization as amqp_serialization
from kombu import message as kombu_message

from dbaas import signing, wire

log = logging.getLogger(__name__)

# Deeper than any message the product sends (a heartbeat is 3 levels): a decoder or the
# pickling of arguments for a pool child would otherwise recurse until the process dies.
MAX_DEPTH = 12
CONTENT_TYPE = "application/json"
ENCODINGS = frozenset({"utf-8", "utf8"})
UNDECODABLE = "dbaas_undecodable"

# Celery's protocol-2 headers, each with the types a message may give it. Anything else is
# refused: a header nobody checks is a header somebody will find a use for.
_STR = (str,)
_OPT_STR = (str, type(None))
HEADER_TYPES = {
    "lang": _STR, "task": _STR, "id": _STR, "shadow": _OPT_STR, "eta": (type(None),),
    "expires": _OPT_STR, "group": (type(None),), "group_index": (type(None),),
    "retries": (int,), "timelimit": (list,), "root_id": _OPT_STR, "parent_id": _OPT_STR,
    "argsrepr": _OPT_STR, "kwargsrepr": _OPT_STR, "origin": _OPT_STR,
    "ignore_result": (bool, type(None)), "replaced_task_nesting": (int,),
    "stamped_headers": (type(None), list), "stamps": (dict,), "celery_beat_task": (bool,),
    wire.AUTH_HEADER: (dict,),
}
REQUIRED_HEADERS = ("task", "id", wire.AUTH_HEADER)
# Headers RabbitMQ itself adds (quorum queues count deliveries; dead-lettering records why).
BROKER_HEADERS = frozenset({
    "x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue",
    "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason",
})
# The body has a size limit; headers have these, so that they cannot carry what the body
# may not (a text header of a megabyte, a mapping of thousands of keys).
MAX_HEADER_TEXT = 1024
MAX_HEADER_ITEMS = 16
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})


class Refused(Exception):
    """The message is malformed, forged or asks for what its sender may not have.
    ``kind`` sorts refusals for metrics: malformed, too_large, headers, encoding, depth,
    unauthenticated, not_allowed (and, later in the conductor, user_id, revoked, invalid)."""

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Principal:
    instance_id: str | None  # None for the control-plane service
    generation: int | None = None

    @property
    def is_service(self) -> bool:
        return self.instance_id is None


SERVICE = Principal(instance_id=None)


@dataclass(frozen=True)
class TaskMessage:
    """A task message that passed every check: who sent it and what it asks."""
    task: str
    id: str
    args: list
    kwargs: dict
    principal: Principal


def within_depth(value, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests no deeper than ``limit`` (iterative: a deep value must not
    be what overflows the stack while checking it)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def _flat(container) -> bool:
    """Whether a mapping or list holds no container: one level, no walk needed (the
    headers the product sends are all such)."""
    children = container.values() if isinstance(container, dict) else container
    return not any(isinstance(child, (dict, list, tuple)) for child in children)


LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodable(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_json(body, content_type, content_encoding, max_bytes: int):
    """The JSON value of a body, or Refused: wrong content type, too big, not UTF-8 JSON
    (NaN and Infinity included), or nested too deep."""
    if content_type != CONTENT_TYPE:
        raise Refused(f"content type {str(content_type)[:64]!r} is not {CONTENT_TYPE}", kind="encoding")
    if content_encoding is not None and str(content_encoding).lower() not in ENCODINGS:
        raise Refused(f"content encoding {str(content_encoding)[:32]!r} is not utf-8", kind="encoding")
    if not isinstance(body, (bytes, str)):
        raise Refused("the body is not bytes", kind="malformed")
    if len(body) > max_bytes:
        raise Refused(f"message of {len(body)} bytes exceeds the {max_bytes}-byte limit", kind="too_large")
    try:
        # Decoded strictly first: json.loads would take UTF-16 or UTF-32 bytes as well.
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Refused(f"undecodable body: {type(exc).__name__}: {str(exc)[:120]}", kind="malformed") from None
    # "\ud800" escapes decode to strings that cannot be encoded again: the database driver
    # would fail on them, and with them the whole batch they are in.
    if LONE_SURROGATE.search(text) and not _encodable(value):
        raise Refused("the body holds a string that is not Unicode text (a lone surrogate)",
                      kind="malformed")
    # Nesting needs an opening bracket per level: a body with few of them (every body the
    # product sends) cannot nest too deep, and is not walked.
    if body.count(b"[" if isinstance(body, bytes) else "[") + \
            body.count(b"{" if isinstance(body, bytes) else "{") > MAX_DEPTH and not within_depth(value):
        raise Refused(f"the body nests deeper than {MAX_DEPTH} levels", kind="depth")
    return value


def check_headers(headers) -> dict:
    if not isinstance(headers, dict):
        raise Refused("headers are not a mapping", kind="headers")
    if UNDECODABLE in headers:
        raise Refused(f"headers not decodable: {headers[UNDECODABLE]}", kind="depth")
    for name in REQUIRED_HEADERS:
        if name not in headers:
            raise Refused(f"no {name!r} header", kind="headers")
    # Every message passes here: exact types (the decoder makes no subclasses; a bool is
    # not an int) and one pass over the headers.
    containers = []
    for name, value in headers.items():
        types = HEADER_TYPES.get(name)
        if types is None:
            if name in BROKER_HEADERS:  # set by the broker, not by the sender: any type
                if type(value) is dict or type(value) is list:
                    containers.append(value)  # but a sender can set them too: as deep as it likes
                continue
            if not isinstance(name, str):
                raise Refused("a header name is not text", kind="headers")
            raise Refused(f"unexpected header {name[:64]!r}", kind="headers")
        kind = type(value)
        if kind not in types:
            raise Refused(f"header {name!r} has the wrong type", kind="headers")
        if kind is str:
            if len(value) > MAX_HEADER_TEXT:
                raise Refused(f"header {name!r} is too large", kind="too_large")
        elif kind is dict or kind is list:
            if len(value) > MAX_HEADER_ITEMS:
                raise Refused(f"header {name!r} is too large", kind="too_large")
            containers.append(value)
    if any(not _flat(value) and not within_depth(value, MAX_DEPTH - 1) for value in containers):
        raise Refused(f"headers nest deeper than {MAX_DEPTH} levels", kind="depth")
    if len(headers["task"]) > 200 or not 0 < len(headers["id"]) <= 64:
        raise Refused("header 'task' or 'id' is too long", kind="headers")
    if headers.get("retries", 0) != 0:
        raise Refused("a retried task (retries > 0) is never sent by the product", kind="not_allowed")
    limits = headers.get("timelimit", [None, None])
    if len(limits) != 2 or any(not (limit is None or _finite_number(limit)) for limit in limits):
        raise Refused("header 'timelimit' is not [soft, hard]", kind="headers")
    return headers


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_body(payload) -> tuple[list, dict]:
    """(args, kwargs) of Celery's ``[args, kwargs, embed]``; an embed asking for anything
    (callbacks, errbacks, chain, chord) is refused: the product never sends one."""
    if not (isinstance(payload, list) and len(payload) == 3):
        raise Refused("the body is not [args, kwargs, embed]", kind="malformed")
    args, kwargs, embed = payload
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        raise Refused("the body is not [list, mapping, mapping]", kind="malformed")
    if set(embed) - EMBED_KEYS or any(embed.values()):
        raise Refused("callbacks, errbacks, chains and chords are refused", kind="not_allowed")
    return args, kwargs


def verify_sender(task_name: str, args, kwargs, header, service_key: str) -> Principal:
    """The sender, if the signature verifies and the sender may call ``task_name`` with
    these arguments: guests only the guest tasks and only about their own instance,
    everything else only the service. Refused otherwise."""
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise Refused("arguments are not a list and a mapping", kind="malformed")
    try:
        claim = signing.parse_header(header)
        signing.verify_claim(service_key, claim, task_name, args, kwargs)
    except signing.AuthError as exc:
        raise Refused(f"unauthenticated: {exc}", kind="unauthenticated") from None
    principal = Principal(claim.instance_id, claim.generation)
    if task_name in wire.GUEST_TASKS:
        if principal.is_service:
            raise Refused(f"{task_name} is sent by guests only", kind="not_allowed")
        instance_id = args[0] if args else kwargs.get("instance_id")
        if instance_id != principal.instance_id:
            raise Refused("instance_id does not match the sender's credentials", kind="not_allowed")
    elif not principal.is_service:
        raise Refused(f"instance credentials may not call {task_name}", kind="not_allowed")
    return principal


def check_task_message(message, *, tasks, max_bytes: int, service_key: str) -> TaskMessage:
    """Every check of a Celery task message (a kombu Message) arriving on a queue that
    serves ``tasks``: shape, size, headers, nesting, signature, and what the sender may
    ask. A guest's message must be a plain call: no expiry, no reply address. Whatever
    else a message makes these checks raise refuses it too: nothing here may end the
    consumer."""
    try:
        return _check_task_message(message, tasks, max_bytes, service_key)
    except Refused:
        raise
    except Exception as exc:
        raise Refused(f"unreadable message: {type(exc).__name__}: {str(exc)[:120]}") from None


def _check_task_message(message, tasks, max_bytes: int, service_key: str) -> TaskMessage:
    if message.errors:  # what kombu could not do while building it (a compressed body)
        raise Refused(f"undecodable message: {message.errors[0][1]}"[:200], kind="encoding")
    headers = check_headers(message.headers)
    task_name = headers["task"]
    if task_name not in tasks:
        raise Refused(f"task {task_name[:64]!r} is not served on this queue", kind="not_allowed")
    args, kwargs = check_body(decode_json(message.body, message.content_type,
                                          message.content_encoding, max_bytes))
    principal = verify_sender(task_name, args, kwargs, headers[wire.AUTH_HEADER], service_key)
    if not principal.is_service and (headers.get("expires") is not None
                                     or message.properties.get("reply_to")):
        raise Refused("a guest's message may not expire or ask for a reply", kind="not_allowed")
    return TaskMessage(task_name, headers["id"], args, kwargs, principal)


def describe(message) -> str:
    """``task[id]`` of a message for a log line, whatever its headers hold."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task, task_id = headers.get("task"), headers.get("id")
    return (f"{task[:64] if isinstance(task, str) else 'message'}"
            f"[{task_id[:64] if isinstance(task_id, str) else '?'}]")


def _guard_amqp_properties():
    """py-amqp decodes a message's properties in the connection's own thread, before any
    consumer sees it: a header table nested a few thousand levels deep (RecursionError)
    or a property that is not UTF-8 (UnicodeDecodeError) raised there and ended the
    process, and the message, never acknowledged, went to the next consumer. Decoding it
    here instead marks the message as undecodable, so it reaches its consumer's checks
    and is refused like any other."""
    decode = amqp_serialization.PROPERTY_CLASSES[60]  # Basic
    if getattr(decode, "guarded", False):
        return

    def decode_guarded(buf, offset):
        try:
            return decode(buf, offset)
        except Exception as exc:  # RecursionError, UnicodeDecodeError of a property…
            return {"application_headers": {UNDECODABLE: f"{type(exc).__name__}"[:64]}}, offset

    decode_guarded.guarded = True
    amqp_serialization.PROPERTY_CLASSES[60] = decode_guarded


_guard_amqp_properties()


def _refuse_compression():
    """kombu decompresses a body whose headers name a compression while it builds the
    message, before any consumer's check: a compressed bomb took half a gigabyte there,
    and a bad one raised through the consumer. The product never compresses, so nothing
    is decompressed: the message carries the failure, and its consumer refuses it."""
    def refuse(body, content_type):
        raise ValueError(f"compressed messages are refused ({str(content_type)[:64]})")
    kombu_message.decompress = refuse


_refuse_compression()
