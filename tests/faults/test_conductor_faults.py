"""The conductor under faults, on a private RabbitMQ node (quorum queues) and private
PostgreSQL: a whole conductor SIGKILLed mid-backlog, one pool child SIGKILLed mid-backlog,
PostgreSQL restarted mid-stream. Nothing is lost and every key ends at its newest message.

Backlogs are published fast, many guests over one connection (tests.support.faults.Publisher),
so the conductors run with DBAAS_REQUIRE_GUEST_USER_ID=false: RabbitMQ cannot vouch for
guests that share a connection.
"""

import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from dbaas import db
from dbaas.models import Backup, Instance, Watermark
from tests.support.faults import Publisher, backups_by_id, instances_by_id, watermarks
from tests.support.private_postgres import PostgresServer
from tests.support.services import pool_children, wait_until
from tests.support.stack import make_backup, make_instances

pytestmark = pytest.mark.fault

IMPERSONATING = {"DBAAS_REQUIRE_GUEST_USER_ID": "false"}


def count(statement) -> int:
    # run_transaction: retried while PostgreSQL restarts.
    return db.run_transaction(lambda session: session.scalar(statement))


def heartbeats_applied() -> int:
    return count(select(func.count()).select_from(Instance).where(Instance.last_heartbeat.is_not(None)))


def backups_completed() -> int:
    return count(select(func.count()).select_from(Backup).where(Backup.state == "COMPLETED"))


def hosts_set() -> int:
    return count(select(func.count()).select_from(Instance).where(Instance.host.is_not(None)))


def test_a_whole_conductor_sigkilled_mid_backlog_loses_nothing(vhost, database_url, make_system):
    """Two conductors drain a backlog on both of their queues — one heartbeat per instance
    and one backup report per backup on the guests' queue, one instance_update cast per
    instance on the control queue, so any lost message leaves its row unchanged; one
    conductor is SIGKILLed (main process and pool) mid-backlog and the other finishes it."""
    system = make_system(vhost.url, database_url, vhost.admin_url(), **IMPERSONATING,
                         DBAAS_HEARTBEAT_BATCH_SIZE="20")
    secrets = make_instances(2000)
    ids = list(secrets)
    backups = {make_backup(i): i for i in ids[:400]}
    now = time.time()
    publisher = Publisher(vhost.url)
    try:
        for instance_id in ids:
            publisher.heartbeat(instance_id, secrets[instance_id], now, "running")
        for backup_id, instance_id in backups.items():
            publisher.update_backup(instance_id, secrets[instance_id], backup_id, now, state="COMPLETED",
                                    size=1.0, checksum="0" * 64)
        wait_until(lambda: publisher.depth() == len(ids) + len(backups), timeout=60,
                   message="the guests' backlog queued")
    finally:
        publisher.close()
    casts = ids[:400]
    for n, instance_id in enumerate(casts):
        system.api.instance_update(instance_id, host=f"10.0.{n // 250}.{n % 250}")
    total = len(ids) + len(backups) + len(casts)

    def applied():
        return heartbeats_applied() + backups_completed() + hosts_set()

    doomed, survivor = system.conductor("doomed", concurrency=2), system.conductor("survivor", concurrency=2)
    system.start(doomed, survivor)
    wait_until(lambda: applied() >= 200, timeout=120, interval=0.02, message="the first messages applied")
    doomed.kill()
    killed_at, at_kill = time.monotonic(), applied()
    assert at_kill < total, "the backlog drained before the kill: the test proves nothing"
    wait_until(lambda: applied() == total, timeout=240, interval=0.5,
               message=f"all {total} messages applied by the survivor")
    drained = time.monotonic() - killed_at
    assert survivor.process.poll() is None, survivor.log()
    assert heartbeats_applied() == len(ids) and backups_completed() == len(backups) \
        and hosts_set() == len(casts)
    print(f"\nconductor SIGKILL mid-backlog: backlog {total} ({len(ids)} heartbeats, {len(backups)} "
          f"backup reports, {len(casts)} casts), applied at the kill {at_kill}, applied {applied()}, "
          f"lost {total - applied()}, survivor drained the rest in {drained:.1f}s")


def socket_owner(port: int, candidates: list[int]) -> int | None:
    """Which of ``candidates`` holds the TCP connection whose local port is ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    for pid in candidates:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return pid
    return None


@contextmanager
def locked_row(instance_id: str):
    """The instance's row locked by a transaction of this process, for the block (which may
    roll it back earlier to let the waiter go)."""
    with db.engine().connect() as lock:
        transaction = lock.begin()
        lock.execute(select(Instance.id).where(Instance.id == instance_id).with_for_update())
        yield transaction


def child_waiting_on_a_lock(children: list[int]) -> int | None:
    # Not on the locking connection: a transaction sees one snapshot of the statistics.
    with db.engine().connect() as watcher:
        ports = watcher.execute(text("SELECT client_port FROM pg_stat_activity "
                                     "WHERE wait_event_type = 'Lock'")).scalars().all()
    return ports and socket_owner(ports[0], children)


def start_with_a_child_on_the_lock(system, conductor, message: str) -> tuple[list[int], int]:
    """Start the conductor (two pool children) while a row is locked; its children, and the
    one that waits on the lock."""
    system.start(conductor)
    children = pool_children(conductor.process.pid)
    assert len(children) == 2, children
    return children, wait_until(lambda: child_waiting_on_a_lock(children), timeout=60, interval=0.02,
                                message=message)


def assert_child_replaced(conductor, children: list[int], doomed: int) -> list[int]:
    """The conductor alive, and the killed child replaced by a new one; the children now."""
    assert conductor.process.poll() is None, conductor.log()
    replaced = pool_children(conductor.process.pid)
    assert len(replaced) == 2 and doomed not in replaced, (children, replaced)
    return replaced


def test_a_pool_child_sigkilled_mid_backlog_loses_nothing(vhost, database_url, make_system):
    """Pool children serve the control queue (calls and casts). A backlog of
    instance_update casts, one per instance. The first instance's row is locked here, so
    the child that takes its cast is certainly in the middle of it when it is SIGKILLed
    (the other child goes on with the backlog): the worker replaces the child, the cast
    it held is redelivered, none is lost."""
    system = make_system(vhost.url, database_url, vhost.admin_url())
    ids = list(make_instances(600))
    for n, instance_id in enumerate(ids):
        system.api.instance_update(instance_id, host=f"10.1.{n // 250}.{n % 250}")
    conductor = system.conductor("conductor", concurrency=2)
    with locked_row(ids[0]) as transaction:
        children, doomed = start_with_a_child_on_the_lock(system, conductor, "a child waiting on the locked row")
        wait_until(lambda: hosts_set() >= 100, timeout=60, interval=0.02,
                   message="the other child well into the backlog")
        os.kill(doomed, signal.SIGKILL)
        killed_at, at_kill = time.monotonic(), hosts_set()
        transaction.rollback()
    assert at_kill < len(ids), "the backlog drained before the kill: the test proves nothing"
    wait_until(lambda: hosts_set() == len(ids), timeout=180, interval=0.5,
               message="every cast applied")
    drained = time.monotonic() - killed_at
    replaced = assert_child_replaced(conductor, children, doomed)
    rows = instances_by_id(ids)
    assert all(rows[i].host == f"10.1.{n // 250}.{n % 250}" for n, i in enumerate(ids))
    assert "WorkerLostError" in conductor.log(), "the killed child held no task"
    print(f"\npool child SIGKILL mid-backlog: backlog {len(ids)} casts, child {doomed} killed in the "
          f"middle of one, applied at the kill {at_kill}, applied {hosts_set()}, lost "
          f"{len(ids) - hosts_set()}, the rest drained in {drained:.1f}s, child replaced by "
          f"{sorted(set(replaced) - set(children))}")


def test_a_pool_child_sigkilled_mid_batch_of_heartbeats_loses_nothing(vhost, database_url, make_system):
    """The guests' batches are written by pool children (ADR 0008). A backlog of heartbeats,
    one per instance; the first instance's row is locked here, so the child writing the
    batch that holds it is certainly in the middle of its transaction when it is SIGKILLed:
    the main process keeps the batch and retries it, the worker replaces the child, and
    every heartbeat is applied."""
    system = make_system(vhost.url, database_url, vhost.admin_url(), **IMPERSONATING,
                         DBAAS_HEARTBEAT_BATCH_SIZE="50")
    secrets = make_instances(600)
    ids = list(secrets)
    now = time.time()
    publisher = Publisher(vhost.url)
    try:
        for instance_id in ids:
            publisher.heartbeat(instance_id, secrets[instance_id], now, "running")
        wait_until(lambda: publisher.depth() == len(ids), timeout=60, message="the backlog queued")
    finally:
        publisher.close()
    conductor = system.conductor("conductor", concurrency=2)
    with locked_row(ids[0]) as transaction:
        children, doomed = start_with_a_child_on_the_lock(
            system, conductor, "a child writing a batch, waiting on the locked row")
        os.kill(doomed, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: "the pool process failed" in conductor.log(), timeout=60,
                   message="the main process told of the lost batch")
        at_kill = heartbeats_applied()
        transaction.rollback()
    assert at_kill < len(ids), "the backlog drained before the kill: the test proves nothing"
    wait_until(lambda: heartbeats_applied() == len(ids), timeout=120, interval=0.5,
               message="every heartbeat applied")
    drained = time.monotonic() - killed_at
    assert_child_replaced(conductor, children, doomed)
    print(f"\npool child SIGKILL mid-batch of heartbeats: backlog {len(ids)}, child {doomed} killed "
          f"inside a batch's transaction, applied before the lock went {at_kill}, applied "
          f"{heartbeats_applied()}, lost {len(ids) - heartbeats_applied()}, drained {drained:.1f}s after the kill")


def test_postgresql_restart_mid_stream_keeps_order_and_loses_nothing(vhost, make_system, tmp_path):
    """A backlog of three heartbeats per instance and three reports per backup
    (BUILDING, SAVING, COMPLETED), in order, spread over the whole backlog; PostgreSQL
    (a private server) restarted while the conductor drains it. Watched throughout, no
    watermark ever goes back; at the end every instance and backup is at its newest
    message, and the conductor never restarted."""
    server = PostgresServer()
    try:
        server.start()
        database_url = server.create_database("dbaas")
        system = make_system(vhost.url, database_url, vhost.admin_url(), **IMPERSONATING,
                             DBAAS_HEARTBEAT_BATCH_SIZE="50")
        secrets = make_instances(400)
        ids = list(secrets)
        backups = {make_backup(i): i for i in ids[:400]}
        statuses = ["building", "crashed", "running"]
        states = [{"state": "BUILDING"}, {"state": "SAVING"},
                  {"state": "COMPLETED", "size": 2.5, "checksum": "f" * 64, "location": "file:///b"}]
        base = time.time() - 100
        publisher = Publisher(vhost.url)
        try:
            for step in range(3):
                for instance_id in ids:
                    publisher.heartbeat(instance_id, secrets[instance_id], base + step, statuses[step])
                for backup_id, instance_id in backups.items():
                    publisher.update_backup(instance_id, secrets[instance_id], backup_id, base + step,
                                            **states[step])
            total = 3 * (len(ids) + len(backups))
            wait_until(lambda: publisher.depth() == total, timeout=60, message="the backlog queued")
        finally:
            publisher.close()

        went_back, seen, stop = [], {}, threading.Event()

        def watch():
            while not stop.is_set():
                try:
                    with db.session_scope() as session:
                        marks = session.execute(select(Watermark.kind, Watermark.key, Watermark.sent)).all()
                except Exception:  # PostgreSQL is restarting
                    time.sleep(0.05)
                    continue
                for kind, key, sent in marks:
                    if sent < seen.get((kind, key), 0):
                        went_back.append((kind, key, seen[(kind, key)], sent))
                    seen[(kind, key)] = sent
                time.sleep(0.05)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        def newest() -> int:
            return sum(1 for sent in watermarks("heartbeat").values() if sent == base + 2) + \
                sum(1 for sent in watermarks("backup").values() if sent == base + 2)

        conductor = system.conductor("conductor")
        system.start(conductor)
        wait_until(lambda: len(seen) >= (len(ids) + len(backups)) // 4, timeout=120, interval=0.02,
                   message="a quarter of the keys seen")
        began = time.monotonic()
        at_restart = newest()
        server.stop("fast")
        time.sleep(2)  # away long enough for several retries
        server.start()
        restart_seconds = time.monotonic() - began
        wait_until(lambda: newest() == len(ids) + len(backups), timeout=240, interval=0.5,
                   message="every key at its newest message")
        drained = time.monotonic() - began
        stop.set()
        watcher.join(10)
        assert conductor.process.poll() is None, conductor.log()
        assert at_restart < len(ids) + len(backups), "drained before the restart: the test proves nothing"
        log = conductor.log()
        assert "database unavailable" in log, "the restart did not reach the conductor"
        assert not re.search(r"refused \S+ on the guests' queue", log), log[-3000:]
        assert not went_back, went_back[:10]
        rows = instances_by_id(ids)
        assert {rows[i].service_status for i in ids} == {"running"}
        finished = backups_by_id(backups)
        assert all(b.state == "COMPLETED" and b.size == 2.5 and b.location == "file:///b"
                   for b in finished.values())
        print(f"\nPostgreSQL restart mid-stream: {total} messages ({len(ids)} instances x 3 heartbeats, "
              f"{len(backups)} backups x 3 reports), keys at their newest at the restart {at_restart}, "
              f"at the end {newest()}, lost {len(ids) + len(backups) - newest()}, watermarks gone back "
              f"{len(went_back)}, restart took {restart_seconds:.1f}s, drained {drained:.1f}s after it began")
    finally:
        server.cleanup()
