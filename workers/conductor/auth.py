"""Who sent a message: proven before the conductor touches anything.

Guests sign with a key derived from the service key, their instance id and the generation
of their credentials (dbaas.signing.guest_secret); the control plane signs with the
service key. So the signature is checked without the database: a forged or unknown
sender costs a MAC, never a transaction. Only a message whose signature verified asks the
database (through a short cache) whether its instance and generation are still live.

Guest-facing tasks accept only an instance principal whose id is the message's
``instance_id``; every other task accepts only the service.
"""

import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from dbaas import intake, settings
from dbaas.models import Instance
from workers.conductor.messages import MessageRejected


Principal = intake.Principal
SERVICE = intake.SERVICE


def verify(task_name: str, args, kwargs, header) -> Principal:
    """The sender, if the signature verifies and the sender may call ``task_name`` with
    these arguments; MessageRejected otherwise. Reads no database."""
    try:
        return intake.verify_sender(task_name, args, kwargs, header, settings.get().service_key)
    except intake.Refused as exc:
        raise MessageRejected(str(exc)) from None


class LiveCredentials:
    """The live credential generation of each instance (None: deleted or unknown), cached
    for ``ttl`` seconds, misses included: a heartbeat batch needs one query, not hundreds,
    and a deleted instance's guest beating on costs no query per beat. A deleted instance's
    credentials so keep verifying for at most ``ttl`` in a running conductor."""

    def __init__(self, ttl: float, max_entries: int = 200_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[int | None, float]] = {}

    def generations(self, session: Session, instance_ids: set[str]) -> dict[str, int | None]:
        now = time.monotonic()
        found = {i: e[0] for i in instance_ids if (e := self._entries.get(i)) and e[1] > now}
        missing = instance_ids - found.keys()
        if missing:
            if len(self._entries) + len(missing) > self.max_entries:
                self._entries.clear()  # bounded memory whatever ids are claimed
            live = dict(session.execute(
                select(Instance.id, Instance.credential_generation)
                .where(Instance.id.in_(missing), Instance.deleted.is_(False))).all())
            for instance_id in missing:
                found[instance_id] = live.get(instance_id)
                self._entries[instance_id] = (found[instance_id], now + self.ttl)
        return found


_cache: LiveCredentials | None = None


def live_credentials() -> LiveCredentials:
    global _cache
    if _cache is None:
        _cache = LiveCredentials(settings.get().credential_cache_seconds)
    return _cache


def refuse_revoked(session: Session, principals: list[Principal]) -> list[str | None]:
    """Per principal: None when its credentials are live (or it is the service), else why not."""
    claimed = {p.instance_id for p in principals if not p.is_service}
    live = live_credentials().generations(session, claimed) if claimed else {}
    return [None if p.is_service or live.get(p.instance_id) == p.generation
            else f"unauthenticated: no live credentials for instance {p.instance_id} "
                 f"generation {p.generation}"
            for p in principals]


def authenticate(session: Session, task_name: str, args, kwargs, header) -> Principal:
    principal = verify(task_name, args, kwargs, header)
    refusal = refuse_revoked(session, [principal])[0]
    if refusal:
        raise MessageRejected(refusal)
    return principal
