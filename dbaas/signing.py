"""Message authentication shared by guests and the control plane.

Every task message carries, in the ``dbaas_auth`` header, an HMAC-SHA256 over the task
name and its JSON arguments, keyed by the sender's secret:

- a guest signs with its own instance's secret and names itself ``instance:<id>`` with
  the generation of its credentials (``gen``);
- control-plane services sign with the service key and name themselves ``service``.

A guest's secret is derived from the service key, the instance id and the generation
(``guest_secret``; see docs/adr/0004): whoever holds the service key can compute it and
nobody stores it. So the conductor verifies any message without a database read, and only
then asks whether that instance and generation are still live. A guest's identity is the
instance whose key verified, and the message's ``instance_id`` must be that instance.
There is no unsigned fallback.

Standard library only: guests import it.
"""

import functools
import hashlib
import hmac
import json
import re
from dataclasses import dataclass

SERVICE_PRINCIPAL = "service"
# compare_digest raises on non-ASCII text: only the exact shape of a MAC gets that far.
HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
INSTANCE_PREFIX = "instance:"
VERSION = 1


class AuthError(Exception):
    """The message does not prove who sent it."""


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical(task_name: str, args, kwargs) -> bytes:
    """A byte form both ends compute identically from the decoded JSON message."""
    return _CANONICAL.encode([task_name, list(args), kwargs]).encode()


def mac(key: str, task_name: str, args, kwargs) -> str:
    return hmac.digest(key.encode(), canonical(task_name, args, kwargs), "sha256").hex()


def instance_principal(instance_id: str) -> str:
    return INSTANCE_PREFIX + instance_id


def _derive(service_key: str, purpose: str, instance_id: str, generation: int) -> str:
    label = f"{purpose}\0{instance_id}\0{generation}".encode()
    return hmac.new(service_key.encode(), label, hashlib.sha256).hexdigest()


# Verifying a guest's message derives its key: remembered, it costs one HMAC less per
# message on the conductor's hottest path (bounded: an entry is ~200 bytes).
@functools.lru_cache(maxsize=65536)
def guest_secret(service_key: str, instance_id: str, generation: int) -> str:
    """The secret of one generation of an instance's guest credentials. A new generation
    (or deleting the instance) revokes the old secret without anything to erase."""
    return _derive(service_key, "dbaas guest key", instance_id, generation)


def guest_broker_password(service_key: str, instance_id: str, generation: int) -> str:
    """The password of the instance's own broker user (a separate derivation: knowing
    one of the two tells nothing of the other)."""
    return _derive(service_key, "dbaas guest broker password", instance_id, generation)


def admin_password(secret: str, generation: int) -> str:
    """The password of the datastore's administrator user, ``generation`` of it, derived
    from the guest's own ``secret``: the guest computes it where it sets it, the control
    plane where it shows it, and it is never stored or sent (docs/adr/0007)."""
    label = f"dbaas admin password\0{generation}".encode()
    return hmac.new(secret.encode(), label, hashlib.sha256).hexdigest()[:32]


def auth_header(principal: str, key: str, task_name: str, args, kwargs,
                generation: int | None = None) -> dict:
    header = {"v": VERSION, "principal": principal, "mac": mac(key, task_name, args, kwargs)}
    if generation is not None:
        header["gen"] = generation
    return header


@dataclass(frozen=True)
class Claim:
    """Who a header says sent the message; nothing is proven yet."""
    principal: str
    digest: str
    generation: int | None

    @property
    def instance_id(self) -> str | None:
        """The claimed instance, or None for the service."""
        return None if self.principal == SERVICE_PRINCIPAL else self.principal[len(INSTANCE_PREFIX):]


def parse_header(header) -> Claim:
    """The claim of a header, or AuthError when it is missing or malformed."""
    if not isinstance(header, dict):
        raise AuthError("missing or malformed dbaas_auth header")
    principal, digest, generation = header.get("principal"), header.get("mac"), header.get("gen")
    if header.get("v") != VERSION or not isinstance(principal, str) or not isinstance(digest, str):
        raise AuthError("malformed dbaas_auth header")
    if len(principal) > 100 or not HEX_DIGEST.fullmatch(digest):
        raise AuthError("malformed dbaas_auth header")
    if principal.startswith(INSTANCE_PREFIX):
        if type(generation) is not int or not 0 < generation < 2 ** 31:
            raise AuthError("an instance's header must carry its credentials' generation")
    elif principal != SERVICE_PRINCIPAL:
        raise AuthError(f"unknown principal {principal[:64]!r}")
    return Claim(principal, digest, generation)


def verify_claim(service_key: str, claim: Claim, task_name: str, args, kwargs) -> None:
    """AuthError unless the claimed sender's key made the MAC."""
    if claim.instance_id is None:
        key = service_key
    else:
        key = guest_secret(service_key, claim.instance_id, claim.generation)
    verify(key, claim.digest, task_name, args, kwargs)


def verify_service(key: str, header, task_name: str, args, kwargs, *, callee: str) -> None:
    """AuthError unless ``header`` proves the control plane signed this message with ``key``;
    ``callee`` names what is protected, for the refusal's message."""
    claim = parse_header(header)
    if claim.principal != SERVICE_PRINCIPAL:
        raise AuthError(f"{claim.principal[:64]!r} may not call the {callee}")
    verify(key, claim.digest, task_name, args, kwargs)


def verify(key: str, digest: str, task_name: str, args, kwargs) -> None:
    try:
        expected = mac(key, task_name, args, kwargs)
    except (TypeError, ValueError) as exc:
        raise AuthError(f"arguments are not canonical JSON: {exc}") from None
    if not hmac.compare_digest(expected, digest):
        raise AuthError("signature does not verify")
