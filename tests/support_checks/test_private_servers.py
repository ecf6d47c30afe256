"""The private RabbitMQ node, RabbitMQ cluster and PostgreSQL of tests/support work, and
leave nothing behind."""

import os
import time
from pathlib import Path

import psycopg2
import pytest
from kombu import Connection, Exchange, Queue

from tests.support.private_postgres import PostgresServer
from tests.support.private_rabbit import RabbitCluster, RabbitNode

pytestmark = pytest.mark.fault


def processes_using(path: Path) -> list[int]:
    """Live processes whose environment or command line mentions path."""
    found, needle = [], str(path).encode()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            proc = Path("/proc", entry)
            if needle in (proc / "environ").read_bytes() + (proc / "cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


def publish(url: str, queue: Queue, body: str) -> None:
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        conn.Producer().publish(body, exchange=queue.exchange, routing_key=queue.routing_key,
                                declare=[queue], delivery_mode="persistent", retry=False)


def get(url: str, queue: Queue, timeout: float = 0) -> str | None:
    """One message from queue (acked), retrying on errors and emptiness until timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Connection(url, connect_timeout=5) as conn:
                message = queue(conn.default_channel).get()
                if message is not None:
                    message.ack()
                    return message.payload
        except Exception as exc:  # e.g. a quorum queue without a leader for a moment
            print(f"  get from {url}: {exc!r}")
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def test_private_rabbit_node_keeps_durable_messages_across_restart():
    node = RabbitNode()
    queue = Queue("smoke", Exchange("smoke", "direct", durable=True), "smoke", durable=True)
    try:
        node.start()
        print(f"\nrabbit node start: {node.start_seconds:.1f}s ({node.node}, {node.url})")
        publish(node.url, queue, "first")
        assert get(node.url, queue) == "first"
        publish(node.url, queue, "durable")
        began = time.monotonic()
        node.restart()
        print(f"rabbit node restart: {time.monotonic() - began:.1f}s")
        assert get(node.url, queue) == "durable"
        publish(node.url, queue, "after a crash")
        node.kill()
        assert not processes_using(node.dir)
        node.start()
        print(f"rabbit node start after SIGKILL: {node.start_seconds:.1f}s")
        assert get(node.url, queue) == "after a crash"
        node.stop()
        assert not node.running and not processes_using(node.dir)
    finally:
        node.cleanup()
    assert not node.dir.exists() and not processes_using(node.dir)


def test_private_postgres_keeps_data_across_restart_and_crash():
    server = PostgresServer()

    def rows(url):
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT note FROM smoke ORDER BY id")
            result = [row[0] for row in cur.fetchall()]
        conn.close()
        return result

    try:
        server.start()
        print(f"\npostgres initdb: {server.initdb_seconds:.2f}s, start: {server.start_seconds:.2f}s")
        url = server.create_database("smoke")
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE smoke (id serial PRIMARY KEY, note text)")
            cur.execute("INSERT INTO smoke (note) VALUES ('before restart')")
        conn.close()
        server.restart("fast")
        assert rows(url) == ["before restart"]
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO smoke (note) VALUES ('before crash')")
        conn.close()
        connected = psycopg2.connect(url)  # a client connected through the crash
        server.kill()
        assert server.postmaster_pid() is None and not processes_using(server.base)
        with pytest.raises(psycopg2.OperationalError):
            connected.cursor().execute("SELECT 1")
        connected.close()
        server.start()
        print(f"postgres start after SIGKILL (crash recovery): {server.start_seconds:.2f}s")
        assert rows(url) == ["before restart", "before crash"]
        server.restart("immediate")
        assert rows(url) == ["before restart", "before crash"]
    finally:
        server.cleanup()
    assert not server.base.exists() and not processes_using(server.base)


def test_quorum_queue_survives_its_leader_being_killed():
    cluster = RabbitCluster()
    queue = Queue("smoke-qq", Exchange("smoke-qq", "direct", durable=True), "smoke-qq",
                  durable=True, queue_arguments={"x-queue-type": "quorum"})
    try:
        cluster.start()
        starts = ", ".join(f"{n.start_seconds:.1f}s" for n in cluster.nodes)
        print(f"\nrabbit cluster formed: {cluster.form_seconds:.1f}s (node starts {starts})")
        publish(cluster.nodes[0].url, queue, "replicated")
        leader = cluster.queue_leader("smoke-qq")
        print(f"leader of smoke-qq: {leader.node}")
        cluster.kill(leader)
        assert not processes_using(leader.dir)
        other = next(n for n in cluster.nodes if n is not leader)
        began = time.monotonic()
        assert get(other.url, queue, timeout=60) == "replicated"
        new_leader = cluster.queue_leader("smoke-qq")
        print(f"consumed from {other.node} {time.monotonic() - began:.1f}s after the kill; "
              f"new leader {new_leader.node}")
        assert new_leader is not leader
    finally:
        cluster.cleanup()
    for node in cluster.nodes:
        assert not node.dir.exists() and not processes_using(node.dir)
