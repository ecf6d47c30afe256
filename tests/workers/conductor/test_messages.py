"""Validation of guest messages (workers.conductor.messages): pure functions, no database."""

import logging
import uuid

import pytest

from workers.conductor.messages import (BackupUpdate, Heartbeat, MessageRejected,
                                        parse_backup_update, parse_heartbeat)

NOW = 1_700_000_000.0
SKEW = 300.0
INSTANCE = str(uuid.uuid4())
BACKUP = str(uuid.uuid4())
SENT = NOW - 5


def heartbeat(*args, **kwargs) -> Heartbeat:
    return parse_heartbeat(list(args), kwargs, NOW, SKEW)


def backup_update(*args, **kwargs) -> BackupUpdate:
    return parse_backup_update(list(args), kwargs, NOW, SKEW)


def refused(parse, *args, match=None, **kwargs) -> str:
    with pytest.raises(MessageRejected, match=match) as info:
        parse(*args, **kwargs)
    return str(info.value)


# --- conductor.heartbeat -------------------------------------------------------------------

def test_heartbeat_positional():
    beat = heartbeat(INSTANCE, {"service_status": "running", "guest_agent_version": "1.0"}, SENT)
    assert beat == Heartbeat(instance_id=INSTANCE, sent=SENT, service_status="running",
                             guest_agent_version="1.0")


def test_heartbeat_keyword_and_mixed_forms_are_the_same_message():
    payload = {"service_status": "healthy"}
    expected = heartbeat(INSTANCE, payload, SENT)
    assert heartbeat(instance_id=INSTANCE, payload=payload, sent=SENT) == expected
    assert heartbeat(INSTANCE, payload=payload, sent=SENT) == expected
    assert heartbeat(INSTANCE, payload, sent=SENT) == expected


def test_heartbeat_empty_payload_is_liveness_only():
    beat = heartbeat(INSTANCE, {}, SENT)
    assert (beat.service_status, beat.guest_agent_version) == (None, None)


def test_heartbeat_integer_sent_becomes_float():
    beat = heartbeat(INSTANCE, {}, int(SENT))
    assert isinstance(beat.sent, float) and beat.sent == int(SENT)


def test_heartbeat_sent_at_the_skew_limit_is_accepted():
    assert heartbeat(INSTANCE, {}, NOW + SKEW).sent == NOW + SKEW


def test_heartbeat_unknown_payload_keys_are_ignored():
    assert heartbeat(INSTANCE, {"uptime": 12, "service_status": "running"}, SENT).service_status == "running"


@pytest.mark.parametrize("status", sorted(
    ["new", "building", "running", "healthy", "shutdown", "crashed", "blocked", "paused",
     "failed to spawn", "unknown", "restart required", "restarting", "upgrading",
     "guestagent error"]))
def test_heartbeat_accepts_every_wire_status(status):
    assert heartbeat(INSTANCE, {"service_status": status}, SENT).service_status == status


def test_heartbeat_missing_sent():
    refused(heartbeat, INSTANCE, {}, match="missing argument 'sent'")


@pytest.mark.parametrize("sent", [
    "1700000000", True, False, None, [SENT], float("nan"), float("inf"), float("-inf"),
    -1.0, 0, NOW + SKEW + 1, 1e300,
], ids=repr)
def test_heartbeat_bad_sent(sent):
    refused(heartbeat, INSTANCE, {}, sent, match="sent")


@pytest.mark.parametrize("instance_id", [
    "not-a-uuid", "", 42, None, INSTANCE.replace("-", ""), "z" * 36, INSTANCE + "0", [INSTANCE],
], ids=repr)
def test_heartbeat_instance_id_must_be_a_uuid(instance_id):
    refused(heartbeat, instance_id, {}, SENT, match="instance_id is not an id")


@pytest.mark.parametrize("payload", [None, "running", ["running"], 1, True], ids=repr)
def test_heartbeat_payload_must_be_a_mapping(payload):
    refused(heartbeat, INSTANCE, payload, SENT, match="payload must be a mapping")


@pytest.mark.parametrize("status", ["potato salad", "RUNNING", "", 7, True, " running"], ids=repr)
def test_heartbeat_unknown_service_status(status):
    refused(heartbeat, INSTANCE, {"service_status": status}, SENT, match="unknown service_status")


@pytest.mark.parametrize("version", [1, ["1.0"], "v" * 65], ids=lambda v: repr(v)[:12])
def test_heartbeat_bad_guest_agent_version(version):
    refused(heartbeat, INSTANCE, {"guest_agent_version": version}, SENT, match="guest_agent_version")


def test_heartbeat_too_many_positional_arguments():
    refused(heartbeat, INSTANCE, {}, SENT, "extra", match="at most 3 positional")


def test_heartbeat_unexpected_keyword_arguments():
    refused(heartbeat, INSTANCE, {}, SENT, service_status="running", match="unexpected arguments")


def test_heartbeat_argument_given_twice():
    refused(heartbeat, INSTANCE, {}, SENT, instance_id=INSTANCE, match="given twice")


@pytest.mark.parametrize("args, kwargs", [({"a": 1}, {}), ([INSTANCE, {}, SENT], [])], ids=["args", "kwargs"])
def test_arguments_of_the_wrong_container_type(args, kwargs):
    for parse in (parse_heartbeat, parse_backup_update):
        with pytest.raises(MessageRejected, match="not a list and a mapping"):
            parse(args, kwargs, NOW, SKEW)


@pytest.mark.parametrize("status", [["running"], {"a": 1}], ids=["list", "dict"])
def test_heartbeat_unhashable_service_status_is_refused(status):
    refused(heartbeat, INSTANCE, {"service_status": status}, SENT)


def test_heartbeat_huge_integer_sent_is_refused():
    refused(heartbeat, INSTANCE, {}, 10 ** 400)


# --- conductor.update_backup ---------------------------------------------------------------

def test_backup_update_positional_with_fields():
    change = backup_update(INSTANCE, BACKUP, SENT, state="COMPLETED", size=2, checksum="sha256=ab",
                           location="file:///b", backup_type="full", fail_reason=None)
    assert change == BackupUpdate(instance_id=INSTANCE, backup_id=BACKUP, sent=SENT, fields={
        "state": "COMPLETED", "size": 2.0, "checksum": "sha256=ab", "location": "file:///b",
        "backup_type": "full", "fail_reason": None})
    assert isinstance(change.fields["size"], float)


def test_backup_update_keyword_form():
    expected = backup_update(INSTANCE, BACKUP, SENT, state="BUILDING")
    assert backup_update(instance_id=INSTANCE, backup_id=BACKUP, sent=SENT, state="BUILDING") == expected
    assert backup_update(INSTANCE, backup_id=BACKUP, sent=SENT, state="BUILDING") == expected


def test_backup_update_without_fields():
    assert backup_update(INSTANCE, BACKUP, SENT).fields == {}


@pytest.mark.parametrize("field", [
    "id", "instance_id", "tenant_id", "name", "description", "parent_id", "created", "updated",
    "deleted", "deleted_at",
])
def test_backup_update_protected_field_refuses_the_whole_message(field):
    # Given next to harmless fields: the message is still refused whole.
    kwargs = {"sent": SENT, "state": "COMPLETED", "size": 1.0, field: "x"}
    with pytest.raises(MessageRejected):
        parse_backup_update([INSTANCE, BACKUP], kwargs, NOW, SKEW)


def test_backup_update_protected_fields_named_in_refusal():
    message = refused(backup_update, INSTANCE, BACKUP, SENT, name="evil", tenant_id="t2", deleted=True)
    assert "not writable" in message and "tenant_id" in message and "name" in message


def test_backup_update_unknown_fields_are_ignored_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="workers.conductor.messages")
    change = backup_update(INSTANCE, BACKUP, SENT, state="SAVING", colour="blue", flavour=3)
    assert change.fields == {"state": "SAVING"}
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "colour" in logged and "flavour" in logged


@pytest.mark.parametrize("field, value", [
    ("size", "big"), ("size", -1), ("size", True), ("size", float("nan")), ("size", float("inf")),
    ("size", None), ("size", [1]),
    ("checksum", 123), ("checksum", "c" * 129), ("checksum", {"sha": "x"}),
    ("location", "l" * 1025), ("backup_type", "t" * 65), ("fail_reason", "f" * 2001),
    ("state", "DONE"), ("state", "completed"), ("state", None), ("state", 3),
], ids=lambda v: repr(v)[:16])
def test_backup_update_bad_field_values(field, value):
    refused(backup_update, INSTANCE, BACKUP, SENT, **{field: value})


@pytest.mark.parametrize("which", ["instance_id", "backup_id"])
def test_backup_update_ids_must_be_uuids(which):
    ids = {"instance_id": INSTANCE, "backup_id": BACKUP, which: "backup-1"}
    refused(backup_update, ids["instance_id"], ids["backup_id"], SENT, match=f"{which} is not an id")


@pytest.mark.parametrize("sent", ["now", True, float("nan"), -3, NOW + SKEW + 10], ids=repr)
def test_backup_update_bad_sent(sent):
    refused(backup_update, INSTANCE, BACKUP, sent, match="sent")


def test_backup_update_missing_sent():
    refused(backup_update, INSTANCE, BACKUP, state="NEW", match="missing argument 'sent'")


def test_backup_update_too_many_positional_arguments():
    refused(backup_update, INSTANCE, BACKUP, SENT, "COMPLETED", match="at most 3 positional")


def test_backup_update_unhashable_state_is_refused():
    refused(backup_update, INSTANCE, BACKUP, SENT, state=["COMPLETED"])


def test_backup_update_huge_integer_size_is_refused():
    refused(backup_update, INSTANCE, BACKUP, SENT, size=10 ** 400)

