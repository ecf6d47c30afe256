"""conductor.heartbeat on a real database: workers.conductor.heartbeats."""

import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from dbaas import db, intake, settings, signing, wire
from dbaas.models import Instance, Watermark
from dbaas.status import HEARTBEAT_EXPIRED
from workers.conductor import heartbeats, instances, ordering
from workers.conductor.consumer import apply_batch
from workers.conductor.messages import Heartbeat

T0 = datetime(2030, 1, 1, 12, 0, 0)
RESTART = "restart required"


def at(seconds: int) -> datetime:
    """A distinct conductor clock reading per batch, so tests can tell which batch wrote."""
    return T0 + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Envelope:
    """A heartbeat message as it reaches the conductor: arguments and the auth header."""
    task_id: str
    args: list
    kwargs: dict
    auth: object


@dataclass
class Guest:
    instance_id: str
    secret: str
    generation: int = 1

    def envelope(self, payload: dict, sent: float, *, instance_id: str | None = None,
                 key: str | None = None) -> Envelope:
        """A heartbeat signed with this guest's credentials (or ``key``), naming
        ``instance_id`` (default: its own instance) in the message."""
        args = [instance_id or self.instance_id, payload, sent]
        header = signing.auth_header(signing.instance_principal(self.instance_id), key or self.secret,
                                     wire.HEARTBEAT_TASK, args, {}, generation=self.generation)
        return Envelope(task_id=str(uuid.uuid4()), args=args, kwargs={}, auth=header)


def new_guest(name: str = "db") -> Guest:
    """An instance in BUILD, as the conductor records it, and its guest's derived secret."""
    instance_id = str(uuid.uuid4())
    db.run_transaction(lambda session: instances.create(session, instance_id, name, None, "default"))
    return Guest(instance_id, signing.guest_secret(settings.get().service_key, instance_id, 1))


@pytest.fixture
def guest(control_plane) -> Guest:
    return new_guest()


def beat(instance_id: str, sent: float, status: str | None = None, version: str | None = None) -> Heartbeat:
    return Heartbeat(instance_id=instance_id, sent=float(sent), service_status=status,
                     guest_agent_version=version)


def apply(*beats: Heartbeat, now: datetime = T0) -> set[str]:
    return db.run_transaction(lambda session: heartbeats.apply_heartbeats(session, list(beats), now))


def handle(*envelopes: Envelope, now: datetime = T0) -> list:
    """As the guests' queue handles them: each sender verified on arrival (dbaas.intake),
    then the verified ones applied in one batch (consumer.apply_batch)."""
    verdicts: list = [None] * len(envelopes)
    accepted = []
    for index, envelope in enumerate(envelopes):
        try:
            principal = intake.verify_sender(wire.HEARTBEAT_TASK, envelope.args, envelope.kwargs,
                                             envelope.auth, settings.get().service_key)
        except intake.Refused as exc:
            verdicts[index] = str(exc)
            continue
        accepted.append((index, intake.TaskMessage(wire.HEARTBEAT_TASK, envelope.task_id,
                                                   envelope.args, envelope.kwargs, principal)))
    outcome = db.run_transaction(lambda session: apply_batch(session, [t for _i, t in accepted], now))
    for (index, _task), verdict in zip(accepted, outcome.verdicts):
        verdicts[index] = None if verdict is None else verdict[1]
    return verdicts


def row(instance_id: str) -> Instance:
    with db.session_scope() as session:
        return session.get(Instance, instance_id)


def watermark(instance_id: str) -> float | None:
    with db.session_scope() as session:
        mark = session.get(Watermark, (ordering.HEARTBEAT, instance_id))
        return mark.sent if mark else None


def update_instance(instance_id: str, **fields) -> None:
    """What the taskmanager's conductor.instance_update does; times travel as ISO text."""
    fields = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in fields.items()}
    db.run_transaction(lambda session: instances.update(session, instance_id, fields))


def snapshot(instance_id: str) -> dict:
    instance = row(instance_id)
    return {column: getattr(instance, column) for column in (
        "service_status", "service_status_updated", "task_status", "last_heartbeat",
        "guest_agent_version", "fault_kind", "fault_message", "fault_at")}


# --- what one heartbeat does ---------------------------------------------------------------

def test_empty_payload_refreshes_last_heartbeat_only(guest):
    before = snapshot(guest.instance_id)
    assert apply(beat(guest.instance_id, 10), now=at(1)) == {guest.instance_id}
    assert snapshot(guest.instance_id) == dict(before, last_heartbeat=at(1))
    assert row(guest.instance_id).task_status == "BUILDING"
    assert watermark(guest.instance_id) == 10


def test_empty_payload_through_the_guests_queue(guest):
    before = snapshot(guest.instance_id)
    assert handle(guest.envelope({}, time.time()), now=at(1)) == [None]
    assert snapshot(guest.instance_id) == dict(before, last_heartbeat=at(1))


def test_service_status_and_version_are_set(guest):
    apply(beat(guest.instance_id, 10, "shutdown", "2.5"), now=at(1))
    instance = row(guest.instance_id)
    assert (instance.service_status, instance.service_status_updated, instance.guest_agent_version,
            instance.last_heartbeat) == ("shutdown", at(1), "2.5", at(1))


@pytest.mark.parametrize("delta", [0, -0.5, -9], ids=["equal", "slightly-older", "older"])
def test_stale_heartbeat_changes_nothing(guest, delta):
    apply(beat(guest.instance_id, 10, "running", "1.0"), now=at(1))
    before = snapshot(guest.instance_id)
    assert apply(beat(guest.instance_id, 10 + delta, "crashed", "6.6"), now=at(2)) == set()
    assert snapshot(guest.instance_id) == before
    assert watermark(guest.instance_id) == 10


def test_stale_heartbeat_through_handle_is_not_an_error(guest):
    sent = time.time()
    handle(guest.envelope({"service_status": "running"}, sent), now=at(1))
    assert handle(guest.envelope({"service_status": "crashed"}, sent - 1), now=at(2)) == [None]
    assert (row(guest.instance_id).service_status, row(guest.instance_id).last_heartbeat) == ("running", at(1))


def test_out_of_order_batches_end_at_the_newest(guest):
    for second, (sent, status) in enumerate([(3, "crashed"), (1, "new"), (5, "running"),
                                             (4, "shutdown"), (2, "building")]):
        apply(beat(guest.instance_id, sent, status), now=at(second))
    instance = row(guest.instance_id)
    assert (instance.service_status, instance.last_heartbeat) == ("running", at(2))
    assert watermark(guest.instance_id) == 5


def test_several_heartbeats_per_instance_in_one_batch(control_plane):
    first, second, third = new_guest("a"), new_guest("b"), new_guest("c")
    applied = apply(
        beat(first.instance_id, 2, "shutdown", "1"), beat(second.instance_id, 4, "blocked"),
        beat(first.instance_id, 7, "running", "3"), beat(first.instance_id, 5, "crashed", "2"),
        beat(second.instance_id, 3, "paused"), beat(third.instance_id, 1),
    )
    assert applied == {first.instance_id, second.instance_id, third.instance_id}
    assert (row(first.instance_id).service_status, row(first.instance_id).guest_agent_version) == ("running", "3")
    assert row(second.instance_id).service_status == "blocked"
    assert row(third.instance_id).service_status is None
    assert [watermark(g.instance_id) for g in (first, second, third)] == [7, 4, 1]


def test_batch_mixing_fresh_and_stale_instances(control_plane):
    fresh, stale = new_guest("fresh"), new_guest("stale")
    apply(beat(stale.instance_id, 50, "running"), now=at(1))
    applied = apply(beat(fresh.instance_id, 1, "running"), beat(stale.instance_id, 40, "crashed"), now=at(2))
    assert applied == {fresh.instance_id}
    assert (row(stale.instance_id).service_status, row(stale.instance_id).last_heartbeat) == ("running", at(1))
    assert row(fresh.instance_id).last_heartbeat == at(2)


# --- "restart required" is sticky ----------------------------------------------------------

def test_restart_required_is_not_overwritten_by_later_heartbeats(guest):
    apply(beat(guest.instance_id, 1, RESTART), now=at(1))
    apply(beat(guest.instance_id, 2, "running"), now=at(2))
    apply(beat(guest.instance_id, 3, "crashed"), now=at(3))
    instance = row(guest.instance_id)
    assert (instance.service_status, instance.service_status_updated) == (RESTART, at(1))
    assert instance.last_heartbeat == at(3)  # liveness still counts
    assert watermark(guest.instance_id) == 3


@pytest.mark.parametrize("order", ["sticky-first", "newer-first"])
def test_restart_required_wins_within_one_batch(guest, order):
    beats = [beat(guest.instance_id, 2, RESTART), beat(guest.instance_id, 3, "running")]
    apply(beat(guest.instance_id, 1, "running"), now=at(0))
    apply(*(beats if order == "sticky-first" else beats[::-1]), now=at(1))
    assert row(guest.instance_id).service_status == RESTART
    assert watermark(guest.instance_id) == 3


def test_stale_restart_required_in_a_batch_is_discarded(guest):
    apply(beat(guest.instance_id, 5, "running"), now=at(0))
    apply(beat(guest.instance_id, 4, RESTART), beat(guest.instance_id, 6, "shutdown"), now=at(1))
    assert row(guest.instance_id).service_status == "shutdown"
    assert watermark(guest.instance_id) == 6


def test_heartbeats_set_status_again_after_the_control_plane_clears_it(guest):
    apply(beat(guest.instance_id, 1, RESTART), now=at(1))
    apply(beat(guest.instance_id, 2, "running"), now=at(2))
    update_instance(guest.instance_id, service_status=None)
    assert row(guest.instance_id).service_status is None
    apply(beat(guest.instance_id, 3, "running"), now=at(3))
    instance = row(guest.instance_id)
    assert (instance.service_status, instance.service_status_updated) == ("running", at(3))


# --- task status and faults ----------------------------------------------------------------

@pytest.mark.parametrize("status, task_status", [
    ("running", "NONE"), ("healthy", "NONE"), ("building", "BUILDING"), ("crashed", "BUILDING"),
    (None, "BUILDING"),
])
def test_alive_heartbeat_ends_building(guest, status, task_status):
    assert row(guest.instance_id).task_status == "BUILDING"
    apply(beat(guest.instance_id, 1, status))
    assert row(guest.instance_id).task_status == task_status


def test_alive_heartbeat_leaves_other_task_statuses(guest):
    update_instance(guest.instance_id, task_status="BACKING_UP")
    apply(beat(guest.instance_id, 1, "running"))
    assert row(guest.instance_id).task_status == "BACKING_UP"


@pytest.mark.parametrize("status, task_status", [
    ("running", "NONE"), ("crashed", "NONE"), ("shutdown", "NONE"), ("failed to spawn", "NONE"),
    ("restarting", "REBOOTING"), ("building", "REBOOTING"), (None, "REBOOTING"),
])
def test_a_settled_status_ends_a_restart(guest, status, task_status):
    """A restart ends with the guest's first report that is not of one under way: a
    datastore that did not come back ends it too (the instance then shows ERROR)."""
    update_instance(guest.instance_id, task_status="REBOOTING")
    apply(beat(guest.instance_id, 1, status))
    assert row(guest.instance_id).task_status == task_status


def set_fault(instance_id: str, kind: str) -> None:
    update_instance(instance_id, fault_kind=kind, fault_message=f"{kind} happened", fault_at=at(-60))


def test_alive_heartbeat_clears_a_missed_heartbeat_fault(guest):
    set_fault(guest.instance_id, HEARTBEAT_EXPIRED)
    apply(beat(guest.instance_id, 1, "running"))
    instance = row(guest.instance_id)
    assert (instance.fault_kind, instance.fault_message, instance.fault_at) == (None, None, None)


@pytest.mark.parametrize("kind, status", [
    ("build_timeout", "running"), ("provisioning_failed", "healthy"),
    (HEARTBEAT_EXPIRED, "crashed"), (HEARTBEAT_EXPIRED, None),
])
def test_other_faults_or_heartbeats_leave_the_fault(guest, kind, status):
    set_fault(guest.instance_id, kind)
    apply(beat(guest.instance_id, 1, status))
    instance = row(guest.instance_id)
    assert (instance.fault_kind, instance.fault_message, instance.fault_at) == (kind, f"{kind} happened", at(-60))


# --- the guests' queue: authentication within a batch --------------------------------------

def test_forged_messages_are_refused_while_valid_ones_apply(control_plane):
    alice, bob, carol = new_guest("alice"), new_guest("bob"), new_guest("carol")
    sent = time.time()
    valid = alice.envelope({"service_status": "running"}, sent)
    unsigned = Envelope("t", [carol.instance_id, {"service_status": "crashed"}, sent], {}, None)
    cases = {
        "alice's credentials naming bob": alice.envelope({"service_status": "crashed"}, sent, instance_id=bob.instance_id),
        "claims bob, signed with alice's secret": bob.envelope({"service_status": "crashed"}, sent, key=alice.secret),
        "unsigned": unsigned,
        "signed by the service": Envelope("t", unsigned.args, {}, signing.auth_header(
            signing.SERVICE_PRINCIPAL, control_plane.service_key, wire.HEARTBEAT_TASK, unsigned.args, {})),
        "bad payload": carol.envelope(["running"], sent),
        "unknown status": carol.envelope({"service_status": "potato salad"}, sent),
        "from the future": carol.envelope({"service_status": "crashed"}, sent + 3600),
    }
    bob_before, carol_before = snapshot(bob.instance_id), snapshot(carol.instance_id)
    verdicts = handle(*cases.values(), valid, now=at(5))
    assert verdicts[-1] is None
    for what, verdict in zip(cases, verdicts):
        assert isinstance(verdict, str) and verdict, what
    assert (row(alice.instance_id).service_status, row(alice.instance_id).last_heartbeat) == ("running", at(5))
    assert snapshot(bob.instance_id) == bob_before
    assert snapshot(carol.instance_id) == carol_before
    assert watermark(bob.instance_id) is None and watermark(carol.instance_id) is None


def rotate(session, instance_id):
    session.get(Instance, instance_id).credential_generation = 2


def delete(session, instance_id):
    session.get(Instance, instance_id).deleted = True


@pytest.mark.parametrize("withdraw", [rotate, delete], ids=["rotated", "deleted"])
def test_withdrawn_guest_is_refused(guest, withdraw):
    db.run_transaction(lambda session: withdraw(session, guest.instance_id))
    [verdict] = handle(guest.envelope({"service_status": "running"}, time.time()))
    assert "no live credentials" in verdict
    instance = row(guest.instance_id)
    assert (instance.last_heartbeat, instance.service_status) == (None, None)
    assert watermark(guest.instance_id) is None


def test_new_generation_is_accepted_and_old_one_refused_in_one_batch(control_plane):
    old, other = new_guest("rotated"), new_guest("other")
    db.run_transaction(lambda session: rotate(session, old.instance_id))
    new = Guest(old.instance_id, signing.guest_secret(control_plane.service_key, old.instance_id, 2), 2)
    sent = time.time()
    verdicts = handle(old.envelope({"service_status": "crashed"}, sent + 1),
                      new.envelope({"service_status": "running"}, sent),
                      other.envelope({"service_status": "running"}, sent), now=at(3))
    assert "no live credentials" in verdicts[0] and verdicts[1:] == [None, None]
    assert (row(old.instance_id).service_status, row(old.instance_id).last_heartbeat) == ("running", at(3))
    assert watermark(old.instance_id) == sent


def test_malformed_status_type_is_refused_alone(control_plane):
    good, bad = new_guest("good"), new_guest("bad")
    sent = time.time()
    verdicts = handle(bad.envelope({"service_status": ["running"]}, sent),
                      good.envelope({"service_status": "running"}, sent))
    assert isinstance(verdicts[0], str) and verdicts[1] is None
    assert row(good.instance_id).service_status == "running"


# --- concurrency ---------------------------------------------------------------------------

STATUSES = sorted(wire.SERVICE_STATUSES - wire.STICKY_SERVICE_STATUSES)


def split_randomly(items: list, rng: random.Random) -> list[list]:
    """``items`` in order, cut into batches of 1 to 4."""
    batches = []
    while items:
        size = rng.randint(1, 4)
        batches.append(items[:size])
        items = items[size:]
    return batches


def test_concurrent_batches_keep_per_instance_order(control_plane):
    """Threads, each with its own transactions, apply shuffled heartbeats for the same few
    instances at once; each instance ends at its newest message."""
    rng = random.Random(1234)
    guests = [new_guest(f"c{i}") for i in range(3)]
    messages = [beat(g.instance_id, 1000 + k + rng.random() / 2, rng.choice(STATUSES), f"v{k}")
                for g in guests for k in range(80)]
    rng.shuffle(messages)
    threads_count = 8
    batches_per_thread = [split_randomly(messages[i::threads_count], rng) for i in range(threads_count)]
    barrier = threading.Barrier(threads_count)
    errors: list = []

    def worker(batches: list[list[Heartbeat]]):
        try:
            barrier.wait(timeout=30)
            for batch in batches:
                db.run_transaction(lambda session: heartbeats.apply_heartbeats(session, batch, T0),
                                   retry_for=30)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(batches,)) for batches in batches_per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    for g in guests:
        newest = max((m for m in messages if m.instance_id == g.instance_id), key=lambda m: m.sent)
        instance = row(g.instance_id)
        assert watermark(g.instance_id) == newest.sent
        assert (instance.service_status, instance.guest_agent_version) == (
            newest.service_status, newest.guest_agent_version)
