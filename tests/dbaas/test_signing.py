"""dbaas.signing: key derivation, headers, MACs and the canonical form. Pure functions."""

import json
import time
import uuid

import pytest
from kombu.utils import json as kombu_json

from dbaas import signing

SERVICE_KEY = "test-service-key"
A, B = str(uuid.uuid4()), str(uuid.uuid4())
TASK = "conductor.heartbeat"


def args_for(instance_id: str) -> list:
    return [instance_id, {"service_status": "running"}, time.time()]


def guest_header(instance_id: str, args, generation: int = 1, kwargs=None, *,
                 key: str | None = None) -> dict:
    key = key or signing.guest_secret(SERVICE_KEY, instance_id, generation)
    return signing.auth_header(signing.instance_principal(instance_id), key, TASK, args, kwargs or {},
                               generation=generation)


def verified(header, args, kwargs=None, task: str = TASK) -> signing.Claim:
    claim = signing.parse_header(header)
    signing.verify_claim(SERVICE_KEY, claim, task, args, kwargs or {})
    return claim


# --- guest_secret: derived, never stored ---------------------------------------------------

def test_guest_secret_is_deterministic_hex():
    secret = signing.guest_secret(SERVICE_KEY, A, 1)
    assert secret == signing.guest_secret(SERVICE_KEY, A, 1)
    assert len(secret) == 64 and int(secret, 16) >= 0


def test_guest_secret_differs_per_instance_generation_and_service_key():
    secrets = {
        signing.guest_secret(SERVICE_KEY, A, 1), signing.guest_secret(SERVICE_KEY, B, 1),
        signing.guest_secret(SERVICE_KEY, A, 2), signing.guest_secret("other-service-key", A, 1),
        SERVICE_KEY,
    }
    assert len(secrets) == 5


def test_guest_secret_fields_cannot_be_shifted_into_each_other():
    """The label separates its parts: no instance id and generation pair reads as another."""
    assert signing.guest_secret(SERVICE_KEY, "ab1", 1) != signing.guest_secret(SERVICE_KEY, "ab", 11)
    assert signing.guest_secret(SERVICE_KEY, A, 12) != signing.guest_secret(SERVICE_KEY, A + "1", 2)


# --- parse_header --------------------------------------------------------------------------

def test_guest_header_carries_its_generation():
    header = guest_header(A, args_for(A), generation=7)
    assert (header["principal"], header["gen"], header["v"]) == (f"instance:{A}", 7, signing.VERSION)
    claim = signing.parse_header(header)
    assert (claim.principal, claim.generation, claim.instance_id) == (f"instance:{A}", 7, A)


def test_service_header_has_no_generation_and_no_instance():
    header = signing.auth_header(signing.SERVICE_PRINCIPAL, SERVICE_KEY, TASK, [], {})
    assert "gen" not in header
    claim = signing.parse_header(header)
    assert (claim.principal, claim.generation, claim.instance_id) == ("service", None, None)


@pytest.mark.parametrize("generation", [None, 0, -1, 2 ** 31, True, "1", 1.0, [1]], ids=repr)
def test_instance_principal_without_a_valid_generation_is_refused(generation):
    header = guest_header(A, args_for(A))
    if generation is None:
        del header["gen"]
    else:
        header["gen"] = generation
    with pytest.raises(signing.AuthError, match="generation"):
        signing.parse_header(header)


@pytest.mark.parametrize("header", [
    None, "instance:x", ["v", 1], {},
    {"v": 2, "principal": "service", "mac": "0" * 64},
    {"v": 1, "principal": "service"},
    {"v": 1, "mac": "0" * 64},
    {"v": 1, "principal": "service", "mac": "0" * 63},
    {"v": 1, "principal": "service", "mac": 7},
    {"v": 1, "principal": 5, "mac": "0" * 64},
    {"v": 1, "principal": "instance:" + "x" * 100, "mac": "0" * 64, "gen": 1},
    {"v": 1, "principal": "admin", "mac": "0" * 64},
    {"v": 1, "principal": "Service", "mac": "0" * 64},
], ids=lambda h: repr(h)[:40])
def test_missing_or_malformed_header_is_refused(header):
    with pytest.raises(signing.AuthError):
        signing.parse_header(header)


# --- verify_claim --------------------------------------------------------------------------

def test_guest_signature_with_its_derived_secret_verifies():
    args = args_for(A)
    assert verified(guest_header(A, args, generation=3), args).instance_id == A


def test_service_signature_verifies():
    args = [A]
    header = signing.auth_header(signing.SERVICE_PRINCIPAL, SERVICE_KEY, TASK, args, {})
    assert verified(header, args).instance_id is None


@pytest.mark.parametrize("forgery", [
    "another instance's secret", "another generation's secret", "claims another generation",
    "claims another instance", "claims the service", "another service key",
])
def test_a_signature_verifies_only_for_the_claimed_instance_and_generation(forgery):
    args = args_for(A)
    header = {
        "another instance's secret": lambda: guest_header(A, args, key=signing.guest_secret(SERVICE_KEY, B, 1)),
        "another generation's secret": lambda: guest_header(A, args, key=signing.guest_secret(SERVICE_KEY, A, 2)),
        "claims another generation": lambda: dict(guest_header(A, args), gen=2),
        "claims another instance": lambda: dict(guest_header(A, args), principal=signing.instance_principal(B)),
        "claims the service": lambda: {k: v for k, v in dict(guest_header(A, args), principal="service").items()
                                       if k != "gen"},
        "another service key": lambda: guest_header(A, args, key=signing.guest_secret("guess", A, 1)),
    }[forgery]()
    with pytest.raises(signing.AuthError, match="does not verify"):
        verified(header, args)


def test_a_guest_secret_is_not_the_service_key():
    args = [A]
    header = signing.auth_header(signing.SERVICE_PRINCIPAL, signing.guest_secret(SERVICE_KEY, A, 1),
                                 TASK, args, {})
    with pytest.raises(signing.AuthError, match="does not verify"):
        verified(header, args)


@pytest.mark.parametrize("tamper", ["args", "kwargs", "added kwarg", "task", "mac"])
def test_tampered_message_does_not_verify(tamper):
    args, kwargs, task = [A, "b" * 36, time.time()], {"state": "BUILDING"}, "conductor.update_backup"
    header = signing.auth_header(signing.instance_principal(A), signing.guest_secret(SERVICE_KEY, A, 1),
                                 task, args, kwargs, generation=1)
    if tamper == "args":
        args = [A, "b" * 36, args[2] + 1]
    elif tamper == "kwargs":
        kwargs = {"state": "COMPLETED"}
    elif tamper == "added kwarg":
        kwargs = {**kwargs, "extra": 1}
    elif tamper == "task":
        task = TASK
    else:
        header = dict(header, mac=header["mac"][::-1])
    with pytest.raises(signing.AuthError, match="does not verify"):
        verified(header, args, kwargs, task=task)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), object()], ids=repr)
def test_non_json_arguments_do_not_verify(bad):
    header = guest_header(A, args_for(A))
    with pytest.raises(signing.AuthError, match="not canonical"):
        verified(header, [A, {}, bad])


def test_verify_service_refuses_a_guest():
    args = args_for(A)
    with pytest.raises(signing.AuthError, match="may not call the taskmanager"):
        signing.verify_service(SERVICE_KEY, guest_header(A, args), TASK, args, {}, callee="taskmanager")
    header = signing.auth_header(signing.SERVICE_PRINCIPAL, SERVICE_KEY, TASK, args, {})
    signing.verify_service(SERVICE_KEY, header, TASK, args, {}, callee="taskmanager")
    with pytest.raises(signing.AuthError, match="does not verify"):
        signing.verify_service("other", header, TASK, args, {}, callee="taskmanager")


# --- canonical form ------------------------------------------------------------------------

def reordered(value):
    """The same JSON value with every mapping's keys in reverse insertion order."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(item) for item in value]
    return value


ROUND_TRIPS = {
    "stdlib": lambda v: json.loads(json.dumps(v)),
    "stdlib-utf8": lambda v: json.loads(json.dumps(v, ensure_ascii=False).encode("utf-8")),
    "kombu": lambda v: kombu_json.loads(kombu_json.dumps(v)),
    "reordered": lambda v: reordered(json.loads(json.dumps(v))),
}


@pytest.mark.parametrize("round_trip", sorted(ROUND_TRIPS))
def test_canonical_form_survives_a_json_round_trip(round_trip):
    args = [A, {"z": 1, "a": {"y": [1, 2.5, None, True], "b": "héllo ☃ 日本 \U0001F600"},
                "m": {"3": 3, "1": 1, "2": 2}}, time.time()]
    kwargs = {"zeta": 0.1 + 0.2, "alpha": "naïve", "nested": {"q": [{"k": 1e-7, "j": 1e21}]}}
    decoded_args, decoded_kwargs = ROUND_TRIPS[round_trip]([args, kwargs])
    assert signing.canonical("t", decoded_args, decoded_kwargs) == signing.canonical("t", args, kwargs)
    header = signing.auth_header("service", "k", "t", args, kwargs)
    signing.verify("k", header["mac"], "t", decoded_args, decoded_kwargs)


def test_canonical_form_is_the_same_for_tuples_and_lists():
    assert signing.canonical("t", (A, 1.5), {}) == signing.canonical("t", [A, 1.5], {})


def test_canonical_form_distinguishes_task_args_and_kwargs():
    forms = {signing.canonical("t", [1], {}), signing.canonical("u", [1], {}),
             signing.canonical("t", [], {"1": 1}), signing.canonical("t", [1.0000001], {})}
    assert len(forms) == 4
