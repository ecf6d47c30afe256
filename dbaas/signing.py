"""Message authentication shared by guests and the control plane.

Every task message carries, in the ``dbaas_auth`` header, an HMAC-SHA256 over the task
name and its JSON arguments, keyed by the sender's secret:

- a guest signs with its own instance's secret and names itself ``instance:<id>``;
- control-plane services sign with the service key and name themselves ``service``.

The conductor looks the key up from the claimed principal, recomputes the MAC and only
then trusts the message; a guest's identity is the instance whose key verified, and the
message's ``instance_id`` must be that instance. There is no unsigned fallback.

Standard library only: guests import it.
"""

import hashlib
import hmac
import json

SERVICE_PRINCIPAL = "service"
INSTANCE_PREFIX = "instance:"
VERSION = 1


class AuthError(Exception):
    """The message does not prove who sent it."""


def canonical(task_name: str, args, kwargs) -> bytes:
    """A byte form both ends compute identically from the decoded JSON message."""
    return json.dumps(
        [task_name, list(args), kwargs],
        sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
    ).encode()


def mac(key: str, task_name: str, args, kwargs) -> str:
    return hmac.new(key.encode(), canonical(task_name, args, kwargs), hashlib.sha256).hexdigest()


def instance_principal(instance_id: str) -> str:
    return INSTANCE_PREFIX + instance_id


def auth_header(principal: str, key: str, task_name: str, args, kwargs) -> dict:
    return {"v": VERSION, "principal": principal, "mac": mac(key, task_name, args, kwargs)}


def parse_header(header) -> tuple[str, str]:
    """(principal, mac) from a header, or AuthError when it is missing or malformed."""
    if not isinstance(header, dict):
        raise AuthError("missing or malformed dbaas_auth header")
    principal, digest = header.get("principal"), header.get("mac")
    if header.get("v") != VERSION or not isinstance(principal, str) or not isinstance(digest, str):
        raise AuthError("malformed dbaas_auth header")
    if len(principal) > 100 or len(digest) != 64:
        raise AuthError("malformed dbaas_auth header")
    return principal, digest


def verify_service(key: str, header, task_name: str, args, kwargs, *, callee: str) -> None:
    """AuthError unless ``header`` proves the control plane signed this message with ``key``;
    ``callee`` names what is protected, for the refusal's message."""
    principal, digest = parse_header(header)
    if principal != SERVICE_PRINCIPAL:
        raise AuthError(f"{principal[:64]!r} may not call the {callee}")
    verify(key, digest, task_name, args, kwargs)


def verify(key: str, digest: str, task_name: str, args, kwargs) -> None:
    try:
        expected = mac(key, task_name, args, kwargs)
    except (TypeError, ValueError) as exc:
        raise AuthError(f"arguments are not canonical JSON: {exc}") from None
    if not hmac.compare_digest(expected, digest):
        raise AuthError("signature does not verify")
