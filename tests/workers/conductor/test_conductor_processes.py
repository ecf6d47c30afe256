"""The conductor as users run it: real ``celery -A dbaas worker -Q trove-conductor``
processes, real brokers and databases, guests publishing signed messages by name."""

import json
import random
import subprocess
import sys
import time
import uuid

import pytest
from kombu import Connection, Producer
from sqlalchemy import func, select

from dbaas import db, signing, wire
from dbaas.models import Backup, Instance, Watermark
from tests.support.guests import Publisher
from tests.support.services import ROOT, wait_until
from tests.support.stack import make_backup, make_instances, publish_heartbeats, snapshot
from workers.guestagent import config as guest_config
from workers.guestagent.client import build_message

STATUSES = ["running", "healthy", "shutdown", "crashed", "paused", "blocked"]


def heartbeats_applied() -> int:
    # run_transaction: the outage test cuts this process's connections too.
    return db.run_transaction(lambda session: session.scalar(
        select(func.count()).where(Instance.last_heartbeat.is_not(None))))


def test_shuffled_heartbeats_end_at_each_instances_newest(stack):
    per_instance = 100 if stack.kind == "rabbitmq-postgresql" else 20
    secrets = make_instances(100)
    base = time.time() - 10_000
    messages = [(instance_id, base + n, random.choice(STATUSES))
                for instance_id in secrets for n in range(per_instance)]
    newest = {}
    for instance_id, sent, status in messages:
        if sent > newest.get(instance_id, (0, None))[0]:
            newest[instance_id] = (sent, status)
    random.shuffle(messages)

    workers = [stack.worker(f"conductor{n}").start() for n in range(3)]
    try:
        publish_heartbeats(stack.broker_url, secrets, messages)

        def all_newest():
            with db.session_scope() as session:
                marks = dict(session.execute(
                    select(Watermark.key, Watermark.sent).where(Watermark.kind == "heartbeat")).all())
                return all(marks.get(i) == sent for i, (sent, _) in newest.items())
        wait_until(all_newest, timeout=240, interval=1, message="every watermark at its newest")
        with db.session_scope() as session:
            statuses = dict(session.execute(select(Instance.id, Instance.service_status)).all())
        assert statuses == {i: status for i, (_, status) in newest.items()}
        for worker in workers:
            assert worker.process.poll() is None, worker.log()
    finally:
        for worker in workers:
            worker.stop()


def test_sigkilled_conductor_mid_backlog_loses_nothing(stack):
    secrets = make_instances(2000)
    now = time.time()
    # One heartbeat per instance: a lost message would leave its instance unseen.
    publish_heartbeats(stack.broker_url, secrets, [(i, now, "running") for i in secrets])
    first = stack.worker("doomed", DBAAS_HEARTBEAT_BATCH_SIZE="20").start()
    try:
        wait_until(lambda: heartbeats_applied() >= 100, timeout=120, interval=0.02,
                   message="the first heartbeats")
        first.kill()
        applied_at_kill = heartbeats_applied()
    finally:
        first.stop()
    assert applied_at_kill < len(secrets), "backlog drained before the kill; test proves nothing"
    second = stack.worker("survivor").start()
    try:
        wait_until(lambda: heartbeats_applied() == len(secrets), timeout=180, interval=0.5,
                   message="every heartbeat after the restart")
    finally:
        second.stop()


def test_hostile_messages_change_nothing_and_the_worker_keeps_serving(stack):
    secrets = make_instances(3)
    (a, secret_a), (b, secret_b), (c, secret_c) = secrets.items()
    backup_b = make_backup(b)

    def delete_c(session):
        session.get(Instance, c).deleted = True
    db.run_transaction(delete_c)
    before = snapshot()
    worker = stack.worker().start()
    try:
        sent = time.time()
        publisher = Publisher(stack.broker_url)
        signed = lambda name, args, kwargs=None, instance=a, secret=secret_a, gen=1: publisher.signed(  # noqa: E731
            name, args, secret, instance, gen, kwargs)
        signed(wire.HEARTBEAT_TASK, [a, {"service_status": "potato salad"}, sent])
        signed(wire.HEARTBEAT_TASK, [a, "not a dict", "yesterday"])
        signed(wire.HEARTBEAT_TASK, [a, {}])                                  # no sent
        signed(wire.HEARTBEAT_TASK, [a, {"junk": "x" * 1_000_000}, sent])    # 1 MB
        signed(wire.UPDATE_BACKUP_TASK, [a, backup_b, sent], {"junk": "x" * 1_000_000})
        signed(wire.HEARTBEAT_TASK, [b, {"service_status": "shutdown"}, sent])  # A's key, B's id
        signed(wire.HEARTBEAT_TASK, [a, {"service_status": "shutdown"}, sent], secret=secret_b)
        signed(wire.UPDATE_BACKUP_TASK, [a, backup_b, sent], {"state": "FAILED"})  # B's backup
        signed(wire.UPDATE_BACKUP_TASK, [b, backup_b, sent], {"state": "FAILED"})  # A's key
        signed(wire.UPDATE_BACKUP_TASK, [b, backup_b, sent], {"name": "x", "state": "FAILED"},
               instance=b, secret=secret_b)                                   # protected field
        signed("conductor.instance_update", [a], {"task_status": "NONE"})    # CRUD as a guest
        signed("conductor.backup_create", [str(uuid.uuid4()), a, "x"])
        signed("celery.map", [{"task": "conductor.instance_update"}, [[a]]])  # builtin
        signed("conductor.instance_deleted", [a])                             # its own record
        signed("conductor.drop_everything", [a])                              # unknown name
        signed(wire.HEARTBEAT_TASK, [c, {"service_status": "running"}, sent],
               instance=c, secret=secret_c)                                   # deleted instance
        unsigned = build_message(a, secret_a, 1, wire.HEARTBEAT_TASK, [a, {"service_status": "shutdown"}, sent])
        del unsigned["headers"][wire.AUTH_HEADER]
        publisher.raw(**unsigned)
        no_generation = [a, {"service_status": "shutdown"}, sent]
        publisher.signed(wire.HEARTBEAT_TASK, no_generation, secret_a, a, headers={
            **build_message(a, secret_a, 1, wire.HEARTBEAT_TASK, no_generation)["headers"],
            wire.AUTH_HEADER: signing.auth_header(signing.instance_principal(a), secret_a,
                                                  wire.HEARTBEAT_TASK, no_generation, {})})
        publisher.close()
        with Connection(stack.broker_url) as connection:
            producer = Producer(connection.default_channel)
            for name, body, content_type in [
                (wire.HEARTBEAT_TASK, b"{not json", "application/json"),
                (wire.UPDATE_BACKUP_TASK, b"{not json", "application/json"),
                (wire.HEARTBEAT_TASK, b"\x80\x04K\x01.", "application/x-python-serialize"),
            ]:
                producer.publish(body, routing_key="trove-conductor", exchange="trove-conductor",
                                 content_type=content_type, content_encoding="utf-8",
                                 headers={"task": name, "id": str(uuid.uuid4()),
                                          wire.AUTH_HEADER: {"v": 1, "principal": "service", "mac": "0" * 64}})

        expected_reasons = ["unknown service_status", "payload must be a mapping", "missing argument",
                            "exceeds the 65536-byte limit", "does not match the sender's credentials",
                            "signature does not verify", "does not belong to the sender's instance",
                            "fields not writable by a guest", "is not served on this queue",
                            "no 'dbaas_auth' header", "undecodable body", "is not application/json",
                            "no live credentials", "must carry its credentials' generation"]
        wait_until(lambda: all(r in worker.log() for r in expected_reasons), timeout=60,
                   message="a log line for every refused message")
        # Still serving: a valid heartbeat sent after all of that is applied.
        publish_heartbeats(stack.broker_url, secrets, [(a, time.time(), "running")])
        wait_until(lambda: heartbeats_applied() == 1, timeout=60, message="the valid heartbeat")
        assert worker.process.poll() is None, worker.log()
        with db.session_scope() as session:
            assert session.get(Instance, b).last_heartbeat is None
            assert session.get(Instance, c).last_heartbeat is None
            assert session.get(Instance, a).deleted is False
            assert session.get(Backup, backup_b).state == "NEW"
        after = [row for row in snapshot() if row.get("id") != a and row.get("key") != a]
        assert after == [row for row in before if row.get("id") != a]
        assert_no_message_left(stack)
    finally:
        worker.stop()


def assert_no_message_left(stack):
    """Refused messages are not redelivered forever: the queue ends empty."""
    if stack.kind != "rabbitmq-postgresql":
        return
    with Connection(stack.broker_url) as connection:
        def empty():
            _name, ready, _consumers = connection.default_channel.queue_declare(
                "trove-conductor", passive=True)
            return ready == 0
        wait_until(empty, timeout=30, message="an empty conductor queue")


def test_guest_command_line_reports_heartbeat_and_backup(stack):
    secrets = make_instances(1)
    [(instance_id, secret)] = secrets.items()
    backup_id = make_backup(instance_id)
    config_path = stack.tmp_path / "guest.json"
    guest_config.write(str(config_path), guest_config.GuestConfig(
        instance_id=instance_id, secret=secret, broker_url=stack.broker_url))
    worker = stack.worker().start()
    try:
        def guest(*args):
            subprocess.run([sys.executable, "-m", "workers.guestagent", *args,
                            "--config", str(config_path)], env=stack.env, cwd=ROOT,
                           check=True, capture_output=True, timeout=60)
        guest("heartbeat", "--status", "running")
        guest("update-backup", "--backup-id", backup_id, "--state", "BUILDING")
        time.sleep(0.01)  # a strictly newer `sent` for the next update of the same backup
        guest("update-backup", "--backup-id", backup_id, "--state", "COMPLETED",
              "--size", "2.5", "--checksum", "ab" * 32, "--location", "file:///backups/x")

        def reported():
            with db.session_scope() as session:
                instance, backup = session.get(Instance, instance_id), session.get(Backup, backup_id)
                return instance.service_status == "running" and backup.state == "COMPLETED" and backup
        backup = wait_until(reported, timeout=60, message="the guest's reports")
        assert (backup.size, backup.checksum, backup.location) == (2.5, "ab" * 32, "file:///backups/x")
        # Through the conductor (a call on its control queue): the CLI has no database.
        shown = subprocess.run([sys.executable, "manage.py", "instance", "show", instance_id, "--json"],
                               env=stack.client_env(), cwd=ROOT, check=True, capture_output=True,
                               text=True, timeout=60)
        view = json.loads(shown.stdout)
        assert (view["status"], view["operating_status"], view["service_status"]) == \
            ("ACTIVE", "RUNNING", "running")
        assert view["last_heartbeat"]
    finally:
        worker.stop()


@pytest.mark.parametrize("stack", ["rabbitmq-postgresql"], indirect=True)
def test_database_outage_means_retries_not_loss(stack):
    secrets = make_instances(50)
    backup_id = make_backup(next(iter(secrets)))
    worker = stack.worker().start()
    try:
        stack.postgres.set_connections_allowed(False)
        now = time.time()
        publish_heartbeats(stack.broker_url, secrets, [(i, now, "running") for i in secrets])
        instance_id = next(iter(secrets))
        publisher = Publisher(stack.broker_url)
        publisher.signed(wire.UPDATE_BACKUP_TASK, [instance_id, backup_id, now], secrets[instance_id],
                         instance_id, kwargs={"state": "BUILDING"})
        publisher.close()
        wait_until(lambda: "database unavailable" in worker.log(), timeout=30,
                   message="the worker noticing the outage")
        time.sleep(3)
        assert worker.process.poll() is None, worker.log()
        stack.postgres.set_connections_allowed(True)
        wait_until(lambda: heartbeats_applied() == len(secrets), timeout=90,
                   message="every heartbeat after the outage")

        def backup_building():
            return db.run_transaction(lambda s: s.get(Backup, backup_id).state == "BUILDING")
        wait_until(backup_building, timeout=90, message="the backup update after the outage")
    finally:
        stack.postgres.set_connections_allowed(True)
        worker.stop()
