"""Message authentication: dbaas.signing and workers.conductor.auth."""

import json
import stat
import sys
import threading
import time
import uuid
from datetime import datetime

import pytest
from kombu.utils import json as kombu_json

from dbaas import db, instances, settings, signing, wire
from dbaas.models import GuestCredential, Instance
from tests.support.stack import configure
from workers.conductor import auth
from workers.conductor.messages import MessageRejected

SERVICE_KEY = "test-service-key"
CRUD_TASK = "conductor.instance_update"
A, B = str(uuid.uuid4()), str(uuid.uuid4())
SECRETS = {A: "a" * 64, B: "b" * 64}


@pytest.fixture
def service_settings(monkeypatch, tmp_path):
    """Settings with a known service key; no database needed."""
    return configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_SERVICE_KEY=SERVICE_KEY)


def heartbeat_args(instance_id: str) -> list:
    return [instance_id, {"service_status": "running"}, time.time()]


def guest_header(claimed: str, task: str, args, kwargs=None, key: str | None = None) -> dict:
    """A header naming instance ``claimed``, signed with ``key`` (default: its own secret)."""
    return signing.auth_header(signing.instance_principal(claimed), key or SECRETS[claimed],
                               task, args, kwargs or {})


def service_header(task: str, args, kwargs=None, key: str = SERVICE_KEY) -> dict:
    return signing.auth_header(signing.SERVICE_PRINCIPAL, key, task, args, kwargs or {})


def authenticate(task, args, kwargs, header):
    return auth.authenticate(task, args, kwargs, header, SECRETS)


def refused(task, args, kwargs, header, match=None) -> str:
    with pytest.raises(MessageRejected, match=match) as info:
        authenticate(task, args, kwargs, header)
    return str(info.value)


# --- guest principals ----------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(wire.GUEST_TASKS))
def test_instance_signature_verifies_for_its_own_instance(service_settings, task):
    args = heartbeat_args(A)
    assert authenticate(task, args, {}, guest_header(A, task, args)) == auth.Principal(instance_id=A)


def test_signature_of_a_verifies_only_for_a(service_settings):
    args = heartbeat_args(A)
    header = guest_header(A, wire.HEARTBEAT_TASK, args)
    # Claiming B with A's MAC: B's secret does not verify it.
    forged = dict(header, principal=signing.instance_principal(B))
    refused(wire.HEARTBEAT_TASK, args, {}, forged, match="does not verify")
    # Claiming A but signed with B's secret.
    refused(wire.HEARTBEAT_TASK, args, {}, guest_header(A, wire.HEARTBEAT_TASK, args, key=SECRETS[B]),
            match="does not verify")


def test_own_credentials_for_another_instance_id_are_refused(service_settings):
    """A guest with valid credentials of A may not speak for B."""
    for task in wire.GUEST_TASKS:
        args = heartbeat_args(B)
        refused(task, args, {}, guest_header(A, task, args), match="does not match")


def test_instance_id_as_keyword_is_bound_to_the_sender(service_settings):
    own = {"instance_id": A, "payload": {}, "sent": time.time()}
    assert authenticate(wire.HEARTBEAT_TASK, [], own,
                        guest_header(A, wire.HEARTBEAT_TASK, [], own)).instance_id == A
    other = {**own, "instance_id": B}
    refused(wire.HEARTBEAT_TASK, [], other, guest_header(A, wire.HEARTBEAT_TASK, [], other),
            match="does not match")


@pytest.mark.parametrize("tamper", ["args", "kwargs", "task", "mac"])
def test_tampered_message_is_refused(service_settings, tamper):
    args, kwargs = [A, "b" * 36, time.time()], {"state": "BUILDING"}
    task = wire.UPDATE_BACKUP_TASK
    header = guest_header(A, task, args, kwargs)
    if tamper == "args":
        args = [A, "b" * 36, args[2] + 1]
    elif tamper == "kwargs":
        kwargs = {"state": "COMPLETED"}
    elif tamper == "task":
        task = wire.HEARTBEAT_TASK
    else:
        header = dict(header, mac=header["mac"][::-1])
    refused(task, args, kwargs, header, match="does not verify")


def test_added_kwarg_is_refused(service_settings):
    args = heartbeat_args(A)
    header = guest_header(A, wire.HEARTBEAT_TASK, args)
    refused(wire.HEARTBEAT_TASK, args, {"extra": 1}, header, match="does not verify")


@pytest.mark.parametrize("header", [
    None, "instance:x", ["v", 1], {},
    {"v": 2, "principal": "service", "mac": "0" * 64},
    {"v": 1, "principal": "service"},
    {"v": 1, "mac": "0" * 64},
    {"v": 1, "principal": "service", "mac": "0" * 63},
    {"v": 1, "principal": "service", "mac": 7},
    {"v": 1, "principal": 5, "mac": "0" * 64},
    {"v": 1, "principal": "instance:" + "x" * 100, "mac": "0" * 64},
    {"v": 1, "principal": "admin", "mac": "0" * 64},
], ids=lambda h: repr(h)[:40])
def test_missing_or_malformed_header_is_refused(service_settings, header):
    args = heartbeat_args(A)
    refused(wire.HEARTBEAT_TASK, args, {}, header, match="unauthenticated")
    refused(CRUD_TASK, [A], {"task_status": "NONE"}, header, match="unauthenticated")


def test_instance_without_credentials_is_refused(service_settings):
    unknown = str(uuid.uuid4())
    args = heartbeat_args(unknown)
    header = signing.auth_header(signing.instance_principal(unknown), "k" * 64, wire.HEARTBEAT_TASK, args, {})
    refused(wire.HEARTBEAT_TASK, args, {}, header, match="no credentials")


def test_non_json_arguments_are_refused(service_settings):
    args = heartbeat_args(A)
    header = guest_header(A, wire.HEARTBEAT_TASK, args)
    refused(wire.HEARTBEAT_TASK, [A, {}, float("nan")], {}, header, match="not canonical")
    refused(wire.HEARTBEAT_TASK, [A, {}, object()], {}, header, match="not canonical")


def test_arguments_that_are_a_mapping_are_refused(service_settings):
    args = {"instance_id": A}
    header = guest_header(A, wire.HEARTBEAT_TASK, list(args))  # the canonical form lists the keys
    refused(wire.HEARTBEAT_TASK, args, {}, header)


# --- service principal ---------------------------------------------------------------------

@pytest.mark.parametrize("task", [CRUD_TASK, "conductor.backup_create"])
def test_service_key_works_for_crud_tasks(service_settings, task):
    args, kwargs = [A], {"task_status": "NONE"}
    assert authenticate(task, args, kwargs, service_header(task, args, kwargs)) is auth.SERVICE


@pytest.mark.parametrize("task", sorted(wire.GUEST_TASKS))
def test_service_key_is_refused_for_guest_tasks(service_settings, task):
    args = heartbeat_args(A)
    refused(task, args, {}, service_header(task, args), match="sent by guests only")


def test_wrong_service_key_is_refused(service_settings):
    args, kwargs = [A], {"task_status": "NONE"}
    refused(CRUD_TASK, args, kwargs, service_header(CRUD_TASK, args, kwargs, key="guess"),
            match="does not verify")


@pytest.mark.parametrize("task", [CRUD_TASK, "conductor.backup_create", "celery.chord_unlock"])
def test_instance_credentials_are_refused_for_crud_tasks(service_settings, task):
    args, kwargs = [A], {"task_status": "NONE"}
    refused(task, args, kwargs, guest_header(A, task, args, kwargs), match="may not call")


def test_instance_secret_used_as_service_principal_is_refused(service_settings):
    args, kwargs = [A], {"task_status": "NONE"}
    refused(CRUD_TASK, args, kwargs, service_header(CRUD_TASK, args, kwargs, key=SECRETS[A]),
            match="does not verify")


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


# --- credentials in the database -----------------------------------------------------------

def create_instances(*names) -> list[tuple[str, str]]:
    def work(session):
        created = [instances.create_instance(session, name) for name in names]
        return [(instance.id, secret) for instance, secret in created]
    return db.run_transaction(work)


def lookup(cache, ids) -> dict:
    return db.run_transaction(lambda session: cache.secrets(session, set(ids)))


def revoke(instance_id):
    def work(session):
        session.get(GuestCredential, instance_id).revoked_at = datetime(2024, 1, 1)
    db.run_transaction(work)


def delete(instance_id):
    def work(session):
        session.get(Instance, instance_id).deleted = True
    db.run_transaction(work)


def test_credential_cache_returns_only_live_credentials(control_plane):
    (live, live_secret), (revoked, _), (deleted, _) = create_instances("live", "revoked", "deleted")
    revoke(revoked)
    delete(deleted)
    unknown = str(uuid.uuid4())
    assert lookup(auth.CredentialCache(ttl=60), [live, revoked, deleted, unknown]) == {live: live_secret}


def test_credential_cache_keeps_a_revoked_secret_for_its_ttl_only(control_plane):
    [(instance_id, secret)] = create_instances("cached")
    cached, uncached = auth.CredentialCache(ttl=60), auth.CredentialCache(ttl=0)
    assert lookup(cached, [instance_id]) == lookup(uncached, [instance_id]) == {instance_id: secret}
    revoke(instance_id)
    assert lookup(cached, [instance_id]) == {instance_id: secret}  # documented: up to ttl
    assert lookup(uncached, [instance_id]) == {}


def test_new_instance_is_known_at_once_despite_an_earlier_miss(control_plane):
    cache = auth.CredentialCache(ttl=60)
    assert lookup(cache, [str(uuid.uuid4())]) == {}
    [(instance_id, secret)] = create_instances("fresh")
    assert lookup(cache, [instance_id]) == {instance_id: secret}


def authenticate_one(task, args, kwargs, header):
    return db.run_transaction(
        lambda session: auth.authenticate_one(session, task, args, kwargs, header), retry_for=0)


def test_authenticate_one_with_real_credentials(control_plane):
    (a, secret_a), (b, _secret_b) = create_instances("a", "b")
    args = heartbeat_args(a)
    header = signing.auth_header(signing.instance_principal(a), secret_a, wire.HEARTBEAT_TASK, args, {})
    assert authenticate_one(wire.HEARTBEAT_TASK, args, {}, header) == auth.Principal(instance_id=a)
    # a's credentials naming b in the message
    args_b = heartbeat_args(b)
    header_b = signing.auth_header(signing.instance_principal(a), secret_a, wire.HEARTBEAT_TASK, args_b, {})
    with pytest.raises(MessageRejected, match="does not match"):
        authenticate_one(wire.HEARTBEAT_TASK, args_b, {}, header_b)


@pytest.mark.parametrize("withdraw", [revoke, delete], ids=["revoked", "deleted"])
def test_withdrawn_credentials_do_not_authenticate(control_plane, withdraw):
    [(instance_id, secret)] = create_instances("gone")
    withdraw(instance_id)
    args = heartbeat_args(instance_id)
    header = signing.auth_header(signing.instance_principal(instance_id), secret, wire.HEARTBEAT_TASK, args, {})
    with pytest.raises(MessageRejected, match="no credentials"):
        authenticate_one(wire.HEARTBEAT_TASK, args, {}, header)


def test_service_key_from_settings_authenticates_crud(control_plane):
    args, kwargs = [A], {"task_status": "NONE"}
    header = signing.auth_header(signing.SERVICE_PRINCIPAL, control_plane.service_key, CRUD_TASK, args, kwargs)
    assert authenticate_one(CRUD_TASK, args, kwargs, header) is auth.SERVICE


# --- the generated service key (embedded setup, no DBAAS_SERVICE_KEY) ----------------------

def load_key(var_dir) -> str | Exception:
    try:
        return settings.load({"DBAAS_VAR_DIR": str(var_dir)}).service_key
    except Exception as exc:  # refusing to start is an acceptable answer, an empty key is not
        return exc


def test_generated_service_key_is_private_and_stable(tmp_path):
    key = load_key(tmp_path)
    assert isinstance(key, str) and len(key) == 64
    assert stat.S_IMODE((tmp_path / "service.key").stat().st_mode) == 0o600
    assert load_key(tmp_path) == key
    assert settings.load({"DBAAS_VAR_DIR": str(tmp_path), "DBAAS_SERVICE_KEY": "configured"}).service_key == "configured"


def test_a_key_file_still_being_written_is_never_an_empty_key(tmp_path):
    (tmp_path / "service.key").write_text("")  # what a reader sees between O_EXCL create and write
    assert load_key(tmp_path) != ""


def test_processes_starting_together_agree_on_one_service_key(tmp_path):
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # make the threads interleave as separate processes would
    try:
        for attempt in range(30):
            var_dir = tmp_path / str(attempt)
            barrier, keys = threading.Barrier(8), []

            def start():
                barrier.wait(timeout=10)
                keys.append(load_key(var_dir))
            threads = [threading.Thread(target=start) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            assert len(set(map(repr, keys))) == 1 and isinstance(keys[0], str) and keys[0], keys
    finally:
        sys.setswitchinterval(interval)
