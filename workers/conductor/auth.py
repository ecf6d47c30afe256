"""Who sent a message: verified before the conductor touches anything.

Guests sign with their instance's secret (see dbaas.signing); the control plane signs
with the service key. Guest-facing tasks accept only an instance principal whose id is
the message's ``instance_id``; every other task accepts only the service.
"""

import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dbaas import settings, signing, wire
from dbaas.models import GuestCredential, Instance
from workers.conductor.messages import MessageRejected


@dataclass(frozen=True)
class Principal:
    instance_id: str | None  # None for the control-plane service

    @property
    def is_service(self) -> bool:
        return self.instance_id is None


SERVICE = Principal(instance_id=None)


class CredentialCache:
    """Instance secrets, cached briefly: a heartbeat batch needs one query, not hundreds.

    A revoked credential keeps verifying for at most ``ttl`` seconds in a running
    conductor. Unknown instances are not cached, so a new instance works at once.
    """

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._entries: dict[str, tuple[str, float]] = {}

    def secrets(self, session: Session, instance_ids: set[str]) -> dict[str, str]:
        now = time.monotonic()
        found = {i: e[0] for i in instance_ids if (e := self._entries.get(i)) and e[1] > now}
        missing = instance_ids - found.keys()
        if missing:
            rows = session.execute(
                select(GuestCredential.instance_id, GuestCredential.secret)
                .join(Instance, Instance.id == GuestCredential.instance_id)
                .where(GuestCredential.instance_id.in_(missing),
                       GuestCredential.revoked_at.is_(None), Instance.deleted.is_(False))
            )
            for instance_id, secret in rows:
                self._entries[instance_id] = (secret, now + self.ttl)
                found[instance_id] = secret
        return found


_cache: CredentialCache | None = None


def credential_cache() -> CredentialCache:
    global _cache
    if _cache is None:
        _cache = CredentialCache(settings.get().credential_cache_seconds)
    return _cache


def claimed_instance(header) -> str | None:
    """The instance a guest message claims to come from (None for the service)."""
    try:
        principal, _digest = signing.parse_header(header)
    except signing.AuthError as exc:
        raise MessageRejected(f"unauthenticated: {exc}") from None
    if principal == signing.SERVICE_PRINCIPAL:
        return None
    if principal.startswith(signing.INSTANCE_PREFIX):
        return principal[len(signing.INSTANCE_PREFIX):]
    raise MessageRejected(f"unauthenticated: unknown principal {principal[:64]!r}")


def authenticate(task_name: str, args, kwargs, header, instance_secrets: dict[str, str]) -> Principal:
    """Verify the message's signature and that its sender may call ``task_name``.

    ``instance_secrets`` must hold the secret of the instance the header claims (see
    ``claimed_instance``); a missing one means no live credential exists.
    """
    claimed = claimed_instance(header)
    _principal, digest = signing.parse_header(header)
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise MessageRejected("arguments are not a list and a mapping")
    if claimed is None:
        key, principal = settings.get().service_key, SERVICE
    else:
        key, principal = instance_secrets.get(claimed), Principal(instance_id=claimed)
        if key is None:
            raise MessageRejected(f"unauthenticated: no credentials for instance {claimed[:64]!r}")
    try:
        signing.verify(key, digest, task_name, args, kwargs)
    except signing.AuthError as exc:
        raise MessageRejected(f"unauthenticated: {exc}") from None
    if task_name in wire.GUEST_TASKS:
        if principal.is_service:
            raise MessageRejected(f"{task_name} is sent by guests only")
        instance_id = args[0] if args else kwargs.get("instance_id")
        if instance_id != principal.instance_id:
            raise MessageRejected("instance_id does not match the sender's credentials")
    elif not principal.is_service:
        raise MessageRejected(f"instance credentials may not call {task_name}")
    return principal


def load_secrets(session: Session, headers) -> dict[str, str]:
    """The secrets of every instance these headers claim; malformed headers are skipped
    here and refused by ``authenticate``."""
    claimed = set()
    for header in headers:
        try:
            claimed.add(claimed_instance(header))
        except MessageRejected:
            pass
    claimed.discard(None)
    return credential_cache().secrets(session, claimed) if claimed else {}


def authenticate_one(session: Session, task_name: str, args, kwargs, header) -> Principal:
    return authenticate(task_name, args, kwargs, header, load_secrets(session, [header]))
