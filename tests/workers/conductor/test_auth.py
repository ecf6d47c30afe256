"""Who sent a message (workers.conductor.auth): signatures checked without the database,
then whether the sender's instance and credential generation are still live.

The pure signing functions (derivation, headers, canonical form) are tested in
tests/dbaas/test_signing.py; the generated service key in tests/dbaas/test_settings.py.
"""

import time
import uuid

import pytest
from sqlalchemy import event

from dbaas import db, signing, wire
from dbaas.models import Instance
from tests.support.stack import SERVICE_KEY, configure
from workers.conductor import api, auth
from workers.conductor.messages import MessageRejected

CRUD_TASK = api.INSTANCE_UPDATE
A, B = str(uuid.uuid4()), str(uuid.uuid4())


def secret(instance_id: str, generation: int = 1) -> str:
    return signing.guest_secret(SERVICE_KEY, instance_id, generation)


@pytest.fixture
def service_settings(monkeypatch, tmp_path):
    """Settings with a known service key and a database URL nobody can reach: verify()
    must not need it."""
    config = configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_SERVICE_KEY=SERVICE_KEY,
                       DBAAS_DATABASE_URL="postgresql://nobody@127.0.0.1:1/no-such-database")

    def no_database(*_args, **_kwargs):
        raise AssertionError("auth.verify used the database")
    monkeypatch.setattr(db, "engine", no_database)
    monkeypatch.setattr(db, "session_scope", no_database)
    return config


def heartbeat_args(instance_id: str) -> list:
    return [instance_id, {"service_status": "running"}, time.time()]


def guest_header(claimed: str, task: str, args, kwargs=None, key: str | None = None,
                 generation: int = 1) -> dict:
    """A header naming instance ``claimed`` and ``generation``, signed with ``key``
    (default: that generation's derived secret)."""
    return signing.auth_header(signing.instance_principal(claimed), key or secret(claimed, generation),
                               task, args, kwargs or {}, generation=generation)


def service_header(task: str, args, kwargs=None, key: str = SERVICE_KEY) -> dict:
    return signing.auth_header(signing.SERVICE_PRINCIPAL, key, task, args, kwargs or {})


def refused(task, args, kwargs, header, match=None) -> str:
    with pytest.raises(MessageRejected, match=match) as info:
        auth.verify(task, args, kwargs, header)
    return str(info.value)


# --- guest principals (no database) --------------------------------------------------------

@pytest.mark.parametrize("task", sorted(wire.GUEST_TASKS))
def test_instance_signature_verifies_for_its_own_instance(service_settings, task):
    args = heartbeat_args(A)
    assert auth.verify(task, args, {}, guest_header(A, task, args)) == auth.Principal(instance_id=A, generation=1)


def test_principal_carries_the_claimed_generation(service_settings):
    args = heartbeat_args(A)
    principal = auth.verify(wire.HEARTBEAT_TASK, args, {}, guest_header(A, wire.HEARTBEAT_TASK, args, generation=4))
    assert principal == auth.Principal(instance_id=A, generation=4) and not principal.is_service


def test_signature_of_a_verifies_only_for_a(service_settings):
    args = heartbeat_args(A)
    header = guest_header(A, wire.HEARTBEAT_TASK, args)
    # Claiming B with A's MAC: B's secret does not verify it.
    forged = dict(header, principal=signing.instance_principal(B))
    refused(wire.HEARTBEAT_TASK, args, {}, forged, match="does not verify")
    # Claiming A but signed with B's secret.
    refused(wire.HEARTBEAT_TASK, args, {}, guest_header(A, wire.HEARTBEAT_TASK, args, key=secret(B)),
            match="does not verify")


def test_signature_of_one_generation_verifies_only_for_it(service_settings):
    args = heartbeat_args(A)
    refused(wire.HEARTBEAT_TASK, args, {}, dict(guest_header(A, wire.HEARTBEAT_TASK, args), gen=2),
            match="does not verify")
    refused(wire.HEARTBEAT_TASK, args, {}, guest_header(A, wire.HEARTBEAT_TASK, args, key=secret(A, 2)),
            match="does not verify")


def test_own_credentials_for_another_instance_id_are_refused(service_settings):
    """A guest with valid credentials of A may not speak for B."""
    for task in wire.GUEST_TASKS:
        args = heartbeat_args(B)
        refused(task, args, {}, guest_header(A, task, args), match="does not match")


def test_instance_id_as_keyword_is_bound_to_the_sender(service_settings):
    own = {"instance_id": A, "payload": {}, "sent": time.time()}
    assert auth.verify(wire.HEARTBEAT_TASK, [], own,
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
    {"v": 1, "principal": "instance:" + "x" * 100, "mac": "0" * 64, "gen": 1},
    {"v": 1, "principal": "admin", "mac": "0" * 64},
    {"v": 1, "principal": f"instance:{A}", "mac": "0" * 64},             # no generation
    {"v": 1, "principal": f"instance:{A}", "mac": "0" * 64, "gen": 0},
    {"v": 1, "principal": f"instance:{A}", "mac": "0" * 64, "gen": "1"},
], ids=lambda h: repr(h)[:40])
def test_missing_or_malformed_header_is_refused(service_settings, header):
    args = heartbeat_args(A)
    refused(wire.HEARTBEAT_TASK, args, {}, header, match="unauthenticated")
    refused(CRUD_TASK, [A], {"task_status": "NONE"}, header, match="unauthenticated")


def test_instance_key_not_derived_from_the_service_key_is_refused(service_settings):
    """Whatever a guest invents, only the service key's derivation verifies."""
    unknown = str(uuid.uuid4())
    args = heartbeat_args(unknown)
    for key in ("k" * 64, signing.guest_secret("another-service-key", unknown, 1), SERVICE_KEY):
        refused(wire.HEARTBEAT_TASK, args, {}, guest_header(unknown, wire.HEARTBEAT_TASK, args, key=key),
                match="does not verify")


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

CONTROL_TASKS = [CRUD_TASK, api.BACKUP_CREATE, api.INSTANCE_CREATE, api.INSTANCE_DELETED, api.SWEEP]


@pytest.mark.parametrize("task", CONTROL_TASKS)
def test_service_key_works_for_control_tasks(service_settings, task):
    args, kwargs = [A], {"task_status": "NONE"}
    principal = auth.verify(task, args, kwargs, service_header(task, args, kwargs))
    assert principal == auth.SERVICE and principal.is_service


@pytest.mark.parametrize("task", sorted(wire.GUEST_TASKS))
def test_service_key_is_refused_for_guest_tasks(service_settings, task):
    args = heartbeat_args(A)
    refused(task, args, {}, service_header(task, args), match="sent by guests only")


def test_wrong_service_key_is_refused(service_settings):
    args, kwargs = [A], {"task_status": "NONE"}
    refused(CRUD_TASK, args, kwargs, service_header(CRUD_TASK, args, kwargs, key="guess"),
            match="does not verify")


@pytest.mark.parametrize("task", [*CONTROL_TASKS, "celery.chord_unlock"])
def test_instance_credentials_are_refused_for_control_tasks(service_settings, task):
    args, kwargs = [A], {"task_status": "NONE"}
    refused(task, args, kwargs, guest_header(A, task, args, kwargs), match="may not call")


def test_instance_secret_used_as_service_principal_is_refused(service_settings):
    args, kwargs = [A], {"task_status": "NONE"}
    refused(CRUD_TASK, args, kwargs, service_header(CRUD_TASK, args, kwargs, key=secret(A)),
            match="does not verify")


# --- live credentials in the database ------------------------------------------------------

def create_instances(count: int) -> list[str]:
    def work(session):
        made = [Instance(name=f"db-{n}", credential_generation=1) for n in range(count)]
        session.add_all(made)
        session.flush()
        return [i.id for i in made]
    return db.run_transaction(work)


def create_instance_with_id(instance_id: str) -> None:
    db.run_transaction(lambda session: session.add(Instance(id=instance_id, name="late")))


def lookup(cache, ids) -> dict:
    return db.run_transaction(lambda session: cache.generations(session, set(ids)))


def rotate(instance_id):
    """A new credential generation: the old secret stops verifying."""
    def work(session):
        session.get(Instance, instance_id).credential_generation += 1
    db.run_transaction(work)


def delete(instance_id):
    def work(session):
        session.get(Instance, instance_id).deleted = True
    db.run_transaction(work)


class Queries:
    """The statements this process sends to the database."""

    def __init__(self):
        self.statements: list[str] = []

    def __call__(self, _conn, _cursor, statement, *_args, **_kwargs):
        self.statements.append(statement)

    @property
    def count(self) -> int:
        return len(self.statements)

    def credential_reads(self, since: int = 0) -> int:
        return sum("credential_generation" in s and s.lstrip().upper().startswith("SELECT")
                   for s in self.statements[since:])


@pytest.fixture
def queries(control_plane):
    counter = Queries()
    event.listen(db.engine(), "before_cursor_execute", counter)
    yield counter
    event.remove(db.engine(), "before_cursor_execute", counter)


def test_live_credentials_are_the_generation_of_live_instances_only(control_plane):
    live, rotated, deleted = create_instances(3)
    rotate(rotated)
    delete(deleted)
    unknown = str(uuid.uuid4())
    assert lookup(auth.LiveCredentials(ttl=60), [live, rotated, deleted, unknown]) == {
        live: 1, rotated: 2, deleted: None, unknown: None}


def test_live_credentials_are_cached_for_their_ttl_only(control_plane):
    [instance_id] = create_instances(1)
    cached, uncached = auth.LiveCredentials(ttl=60), auth.LiveCredentials(ttl=0)
    assert lookup(cached, [instance_id]) == lookup(uncached, [instance_id]) == {instance_id: 1}
    delete(instance_id)
    assert lookup(cached, [instance_id]) == {instance_id: 1}  # documented: up to ttl
    assert lookup(uncached, [instance_id]) == {instance_id: None}


def test_misses_are_cached_too(control_plane, queries):
    """A deleted instance's guest beating on costs no query per beat. (So an id looked up
    before its instance exists reads as unknown for up to ttl: ids are fresh UUIDs and a
    guest is started only after its instance committed.)"""
    cache, unknown = auth.LiveCredentials(ttl=60), str(uuid.uuid4())
    assert lookup(cache, [unknown]) == {unknown: None}
    assert queries.credential_reads() == 1
    before = queries.count
    assert lookup(cache, [unknown]) == {unknown: None}
    create_instance_with_id(unknown)
    assert lookup(cache, [unknown]) == {unknown: None}
    assert queries.credential_reads(before) == 0
    assert lookup(auth.LiveCredentials(ttl=0), [unknown]) == {unknown: 1}


def test_one_query_for_many_instances(control_plane, queries):
    ids = create_instances(50)
    cache = auth.LiveCredentials(ttl=60)
    with db.session_scope() as session:
        session.connection()  # BEGIN (and SQLite's pragmas) before counting
        before = queries.count
        assert cache.generations(session, set(ids)) == dict.fromkeys(ids, 1)
        assert queries.count - before == queries.credential_reads(before) == 1
        assert cache.generations(session, set(ids[:10])) == dict.fromkeys(ids[:10], 1)
        assert queries.count - before == 1


def test_cache_memory_is_bounded(control_plane):
    cache = auth.LiveCredentials(ttl=60, max_entries=10)
    ids = [str(uuid.uuid4()) for _ in range(25)]
    for start in range(0, 25, 5):
        lookup(cache, ids[start:start + 5])
        assert len(cache._entries) <= 10


def authenticate(task, args, kwargs, header):
    return db.run_transaction(
        lambda session: auth.authenticate(session, task, args, kwargs, header), retry_for=0)


def test_authenticate_with_live_credentials(control_plane):
    a, b = create_instances(2)
    args = heartbeat_args(a)
    header = guest_header(a, wire.HEARTBEAT_TASK, args)
    assert authenticate(wire.HEARTBEAT_TASK, args, {}, header) == auth.Principal(instance_id=a, generation=1)
    # a's credentials naming b in the message
    args_b = heartbeat_args(b)
    with pytest.raises(MessageRejected, match="does not match"):
        authenticate(wire.HEARTBEAT_TASK, args_b, {}, guest_header(a, wire.HEARTBEAT_TASK, args_b))


@pytest.mark.parametrize("withdraw", [rotate, delete], ids=["rotated", "deleted"])
def test_withdrawn_credentials_do_not_authenticate(control_plane, withdraw):
    [instance_id] = create_instances(1)
    withdraw(instance_id)
    args = heartbeat_args(instance_id)
    with pytest.raises(MessageRejected, match="no live credentials"):
        authenticate(wire.HEARTBEAT_TASK, args, {}, guest_header(instance_id, wire.HEARTBEAT_TASK, args))


def test_a_generation_ahead_of_the_database_is_refused(control_plane):
    [instance_id] = create_instances(1)
    args = heartbeat_args(instance_id)
    with pytest.raises(MessageRejected, match="no live credentials"):
        authenticate(wire.HEARTBEAT_TASK, args, {},
                     guest_header(instance_id, wire.HEARTBEAT_TASK, args, generation=2))
    rotate(instance_id)
    auth._cache = None  # a conductor started after the rotation
    assert authenticate(wire.HEARTBEAT_TASK, args, {},
                        guest_header(instance_id, wire.HEARTBEAT_TASK, args, generation=2)).generation == 2


def test_unknown_instance_with_a_derived_key_is_refused(control_plane):
    """Even a correctly derived key is no good without a live instance."""
    unknown = str(uuid.uuid4())
    args = heartbeat_args(unknown)
    with pytest.raises(MessageRejected, match="no live credentials"):
        authenticate(wire.HEARTBEAT_TASK, args, {}, guest_header(unknown, wire.HEARTBEAT_TASK, args))


def test_refuse_revoked_answers_per_principal_in_order(control_plane):
    live, rotated, deleted = create_instances(3)
    rotate(rotated)
    delete(deleted)
    principals = [auth.Principal(live, 1), auth.SERVICE, auth.Principal(rotated, 1),
                  auth.Principal(deleted, 1), auth.Principal(rotated, 2), auth.Principal(live, 1)]
    verdicts = db.run_transaction(lambda session: auth.refuse_revoked(session, principals))
    assert [v is None for v in verdicts] == [True, True, False, False, True, True]
    assert rotated in verdicts[2] and deleted in verdicts[3]


def test_service_needs_no_query(control_plane, queries):
    with db.session_scope() as session:
        session.connection()
        before = queries.count
        assert auth.refuse_revoked(session, [auth.SERVICE]) == [None]
        assert queries.count == before


def test_service_key_from_settings_authenticates_control_tasks(control_plane):
    args, kwargs = [A], {"task_status": "NONE"}
    header = signing.auth_header(signing.SERVICE_PRINCIPAL, control_plane.service_key, CRUD_TASK, args, kwargs)
    assert authenticate(CRUD_TASK, args, kwargs, header) == auth.SERVICE
