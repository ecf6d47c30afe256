"""A command to a guest is sent again when the broker refuses it for a moment (found by
tests/faults/test_rabbit_cluster.py: while a quorum queue elects a new leader RabbitMQ
nacks publishes to it, kombu gives up on a nack, and the taskmanager failed the backup at
once — then the create_backup, redelivered because its ack was lost in the same failover,
sent the command anyway: the guest stored a backup whose record said FAILED)."""

import pytest
from amqp.exceptions import MessageNacked
from kombu.exceptions import OperationalError

from tests.support.stack import configure
from tests.workers.taskmanager.test_deleted_instances import RecordingConductor
from workers.conductor import api as conductor_api
from workers.taskmanager import guests
from workers.taskmanager.guests import GuestUnreachable
from workers.taskmanager.manager import Manager


def nacked() -> OperationalError:
    try:
        raise OperationalError("") from MessageNacked()
    except OperationalError as exc:
        return exc


@pytest.fixture
def sends(monkeypatch, tmp_path):
    """send_command replaced: it raises what ``outcomes`` holds in turn (None: sent)."""
    configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_BROKER_URL="memory://",
              DBAAS_SERVICE_KEY="k" * 32)
    monkeypatch.setattr(guests, "SEND_BACKOFF", (0, 0, 0))
    calls, outcomes = [], []

    def send_command(broker_url, instance_id, secret, command, args, queue_type):
        calls.append(command)
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome
    monkeypatch.setattr(guests, "send_command", send_command)
    return calls, outcomes


def test_a_nacked_command_is_sent_again(sends):
    calls, outcomes = sends
    outcomes.extend([nacked(), ConnectionResetError(104, "Connection reset by peer")])
    guests.send("i", 1, "backup", {"backup_id": "b"})
    assert calls == ["backup"] * 3


def test_a_command_the_broker_keeps_refusing_is_reported_with_its_cause(sends):
    calls, outcomes = sends
    outcomes.extend([nacked()] * guests.SEND_ATTEMPTS)
    with pytest.raises(GuestUnreachable, match=r"cannot send restart to the guest of i: MessageNacked\(\)"):
        guests.send("i", 1, "restart", {})
    assert len(calls) == guests.SEND_ATTEMPTS


def test_what_is_not_a_command_is_not_sent_again(sends):
    calls, outcomes = sends
    outcomes.append(ValueError("unknown guest command 'x'"))
    with pytest.raises(GuestUnreachable, match="unknown guest command"):
        guests.send("i", 1, "x", {})
    assert calls == ["x"]


class RunningDriver:
    def is_running(self, instance_id):
        return True


def test_a_backup_survives_a_nacked_command(sends):
    calls, outcomes = sends
    outcomes.append(nacked())
    conductor = RecordingConductor()
    Manager(RunningDriver(), conductor).create_backup("b", "i", 1)
    assert calls == ["backup", "backup"]
    assert [task for task, _, _ in conductor.sent if task == conductor_api.BACKUP_FAIL] == []
