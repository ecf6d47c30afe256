"""Validation of guest messages into plain values. Anything unexpected is refused whole."""

import logging
import math
import re
import uuid
from dataclasses import dataclass

from dbaas import wire

log = logging.getLogger(__name__)

# Backup columns a guest must never set: a message naming one is refused whole.
PROTECTED_BACKUP_FIELDS = frozenset({
    "id", "instance_id", "tenant_id", "name", "description", "parent_id", "created",
    "updated", "deleted", "deleted_at",
})
STRING_LIMITS = {"checksum": 128, "location": 1024, "backup_type": 64, "fail_reason": 2000}
# The form every id the product makes has: taken as it is, without building a UUID.
CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class MessageRejected(Exception):
    """The message is malformed, forged or not allowed; it changes nothing."""


@dataclass(frozen=True)
class Heartbeat:
    instance_id: str
    sent: float
    service_status: str | None
    guest_agent_version: str | None


@dataclass(frozen=True)
class BackupUpdate:
    instance_id: str
    backup_id: str
    sent: float
    fields: dict


def bind(args, kwargs, names: tuple[str, ...]) -> tuple[dict, dict]:
    """Map positional and keyword arguments onto ``names``; return (bound, the rest)."""
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise MessageRejected("arguments are not a list and a mapping")
    if not kwargs and len(args) == len(names):  # how the product sends: all positional
        return dict(zip(names, args)), {}
    if len(args) > len(names):
        raise MessageRejected(f"expected at most {len(names)} positional arguments, got {len(args)}")
    bound = dict(zip(names, args))
    rest = dict(kwargs)
    for name in names[len(args):]:
        if name not in rest:
            raise MessageRejected(f"missing argument {name!r}")
        bound[name] = rest.pop(name)
    duplicated = set(names[:len(args)]) & set(rest)
    if duplicated:
        raise MessageRejected(f"argument given twice: {sorted(duplicated)}")
    return bound, rest


def object_id(value, what: str) -> str:
    if isinstance(value, str) and len(value) == 36:
        if CANONICAL_ID.fullmatch(value):
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise MessageRejected(f"{what} is not an id")


def finite_number(value) -> float | None:
    """The value as a float, or None unless it is a finite JSON number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer of hundreds of digits
        return None
    return number if math.isfinite(number) else None


def sent_time(value, now: float, max_skew: float) -> float:
    value = finite_number(value)
    if value is None:
        raise MessageRejected("sent must be a number of epoch seconds")
    if value <= 0:
        raise MessageRejected("sent must be positive")
    if value > now + max_skew:
        raise MessageRejected(f"sent is {value - now:.0f}s ahead of the conductor's clock")
    return value


def parse_heartbeat(args, kwargs, now: float, max_skew: float) -> Heartbeat:
    bound, extra = bind(args, kwargs, ("instance_id", "payload", "sent"))
    if extra:
        raise MessageRejected(f"unexpected arguments {sorted(extra)}")
    payload = bound["payload"]
    if not isinstance(payload, dict):
        raise MessageRejected("payload must be a mapping")
    status = payload.get("service_status")
    if status is not None and not (isinstance(status, str) and status in wire.SERVICE_STATUSES):
        raise MessageRejected(f"unknown service_status {str(status)[:64]!r}")
    version = payload.get("guest_agent_version")
    if version is not None and not (isinstance(version, str) and len(version) <= 64):
        raise MessageRejected("guest_agent_version must be a string of at most 64 characters")
    return Heartbeat(
        instance_id=object_id(bound["instance_id"], "instance_id"),
        sent=sent_time(bound["sent"], now, max_skew),
        service_status=status,
        guest_agent_version=version,
    )


def parse_backup_update(args, kwargs, now: float, max_skew: float) -> BackupUpdate:
    bound, fields = bind(args, kwargs, ("instance_id", "backup_id", "sent"))
    protected = PROTECTED_BACKUP_FIELDS & set(fields)
    if protected:
        raise MessageRejected(f"fields not writable by a guest: {sorted(protected)}")
    unknown = set(fields) - wire.GUEST_WRITABLE_BACKUP_FIELDS
    if unknown:
        log.info("update_backup: ignoring unknown fields %s", sorted(str(f)[:64] for f in unknown)[:20])
    allowed = {name: _backup_field(name, value) for name, value in fields.items()
               if name in wire.GUEST_WRITABLE_BACKUP_FIELDS}
    return BackupUpdate(
        instance_id=object_id(bound["instance_id"], "instance_id"),
        backup_id=object_id(bound["backup_id"], "backup_id"),
        sent=sent_time(bound["sent"], now, max_skew),
        fields=allowed,
    )


def _backup_field(name: str, value):
    if name == "state":
        if not (isinstance(value, str) and value in wire.BACKUP_STATE_RANK):
            raise MessageRejected(f"unknown backup state {str(value)[:32]!r}")
        return value
    if name == "size":
        size = finite_number(value)
        if size is None or size < 0:
            raise MessageRejected("size must be a non-negative number")
        return size
    if value is not None and not (isinstance(value, str) and len(value) <= STRING_LIMITS[name]):
        raise MessageRejected(f"{name} must be a string of at most {STRING_LIMITS[name]} characters")
    return value
