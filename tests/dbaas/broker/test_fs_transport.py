"""The dbaasfs transport between real OS processes: kombu producers and consumers, Celery workers."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from dbaas.broker import broker_url_for
from tests.support.services import ROOT as REPO

pytestmark = pytest.mark.timeout(120)

KOMBU_CHILD = """
import json, os, socket, sys
import dbaas.broker
from kombu import Connection, Exchange, Queue

PAD = "x" * 300
queue = Queue("work", Exchange("work"), "work")
url, role = sys.argv[1], sys.argv[2]
options = json.loads(os.environ.get("BROKER_OPTIONS", "{}"))

with Connection(url, transport_options=options) as conn:
    if role == "produce":
        name, count = sys.argv[3], int(sys.argv[4])
        producer = conn.Producer()
        for seq in range(count):
            producer.publish({"id": f"{name}:{seq}", "pad": PAD}, exchange=queue.exchange,
                             routing_key="work", declare=[queue], serializer="json")
        sys.exit()
    received_path, stop_path = sys.argv[3], sys.argv[4]
    with open(received_path, "a", buffering=1) as received:
        def on_message(body, message):
            intact = isinstance(body, dict) and body.get("pad") == PAD
            received.write((body["id"] if intact else "CORRUPT") + "\\n")
            if role == "ack":
                message.ack()
        # role "hold" never acks: it keeps its 10 prefetched messages until killed
        with conn.Consumer(queue, callbacks=[on_message], prefetch_count=10):
            while True:
                try:
                    conn.drain_events(timeout=0.2)
                except socket.timeout:
                    if os.path.exists(stop_path):
                        break
"""

TINY_APP = """
import os, time
import dbaas.broker  # registers dbaasfs://
from celery import Celery

app = Celery("tinyapp", broker=os.environ["TINY_BROKER_URL"])
app.conf.update(task_acks_late=True, task_serializer="json", accept_content=["json"],
                event_serializer="json", broker_transport_options={"housekeeping_interval": 0.5})

@app.task(name="tinyapp.record")
def record(n):
    time.sleep(0.1)
    with open(os.environ["TINY_DONE"], "a") as done:
        done.write(f"{n}\\n")
"""


@pytest.fixture
def spawn(tmp_path):
    """Start child processes, each in its own process group; all of them killed at teardown."""
    started = []

    def start(args, log_name, **env):
        log = open(tmp_path / log_name, "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", **env))
        log.close()
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            kill_group(proc)


def kill_group(proc):
    if proc.returncode is None:  # not reaped yet, so its group id cannot have been reused
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def lines(path):
    return path.read_text().split() if path.exists() else []


def kombu_child(spawn, url, role, *args, **env):
    log_name = f"{role}-{Path(str(args[0])).name}.log"
    return spawn([sys.executable, "-c", KOMBU_CHILD, url, role, *map(str, args)], log_name, **env)


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def ready(messages):
    """Message files waiting in every queue's directory under ``messages``."""
    return sorted(p.name for queue in messages.iterdir() for p in queue.iterdir())


def publish(url, ids, queue=Queue("work", Exchange("work"), "work"), **options):
    with Connection(url, transport_options=options) as conn:
        producer = conn.Producer()
        for message_id in ids:
            producer.publish({"id": message_id, "pad": "x" * 300}, exchange=queue.exchange,
                             routing_key=queue.routing_key, declare=[queue], serializer="json")


def test_concurrent_producers_and_consumers_lose_and_corrupt_nothing(tmp_path, spawn):
    url = broker_url_for(tmp_path / "broker")
    stop = tmp_path / "stop"
    received = [tmp_path / f"received-{i}" for i in range(3)]
    consumers = [kombu_child(spawn, url, "ack", path, stop) for path in received]
    producers = [kombu_child(spawn, url, "produce", f"p{i}", 500) for i in range(8)]
    expected = {f"p{i}:{seq}" for i in range(8) for seq in range(500)}

    for producer in producers:
        assert producer.wait(timeout=40) == 0
    wait_until(lambda: sum(len(lines(path)) for path in received) >= len(expected), 30, "all messages")
    stop.touch()
    for consumer in consumers:
        assert consumer.wait(timeout=10) == 0

    got = [line for path in received for line in lines(path)]
    assert "CORRUPT" not in got
    assert set(got) == expected
    assert len(got) - len(set(got)) == 0, "duplicates without any crash"
    assert all(len(lines(path)) > 0 for path in received), "every consumer got a share"
    assert files(tmp_path / "broker" / "unacked") == []
    assert ready(tmp_path / "broker" / "messages") == []


def test_messages_held_by_a_killed_consumer_go_to_another_consumer(tmp_path, spawn):
    url = broker_url_for(tmp_path / "broker")
    ids = [f"m:{seq}" for seq in range(30)]
    publish(url, ids)
    stop, held, survived = tmp_path / "stop", tmp_path / "held", tmp_path / "survived"

    holder = kombu_child(spawn, url, "hold", held, stop)
    wait_until(lambda: len(lines(held)) == 10, 15, "the holder's 10 prefetched messages")
    survivor = kombu_child(spawn, url, "ack", survived, stop, BROKER_OPTIONS='{"housekeeping_interval": 0.3}')
    wait_until(lambda: len(lines(survived)) == 20, 15, "the 20 messages not held")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    wait_until(lambda: len(lines(survived)) == 30, 15, "the killed consumer's messages")
    stop.touch()
    assert survivor.wait(timeout=10) == 0

    assert sorted(lines(survived)) == sorted(ids)  # each exactly once
    assert set(lines(held)) <= set(lines(survived))


def test_reject_with_requeue_puts_the_message_back_once(tmp_path):
    url = broker_url_for(tmp_path / "broker")
    publish(url, ["only"])
    broker = tmp_path / "broker"
    queue = Queue("work", Exchange("work"), "work")
    with Connection(url) as conn:
        first = queue(conn.channel()).get(no_ack=False)
        assert ready(broker / "messages") == [] and len(files(broker / "unacked")) == 1
        first.reject(requeue=True)
        assert len(ready(broker / "messages")) == 1 and files(broker / "unacked") == []

        again = queue(conn.channel()).get(no_ack=False)
        assert again.payload["id"] == "only"
        assert queue(conn.channel()).get(no_ack=False) is None
    # closing the connection restored the unacked message, once, without a kombu-style copy
    assert len(ready(broker / "messages")) == 1 and files(broker / "unacked") == []
    with Connection(url) as conn:
        last = queue(conn.channel()).get(no_ack=False)
        last.ack()
        assert queue(conn.channel()).get(no_ack=False) is None
    assert ready(broker / "messages") == [] and files(broker / "unacked") == []


def test_a_forked_child_leaves_its_parents_unacked_messages_alone(tmp_path):
    url = broker_url_for(tmp_path / "broker")
    publish(url, ["held", "free"])
    queue = Queue("work", Exchange("work"), "work")
    with Connection(url) as conn:
        held = queue(conn.channel()).get(no_ack=False)
        child = os.fork()
        if child == 0:
            code = 1
            try:  # a new connection recovers dead owners' messages as it opens: the parent is alive
                with Connection(url) as child_conn:
                    got = [queue(child_conn.channel()).get(no_ack=True) for _ in range(2)]
                    code = 0 if got[0].payload["id"] == "free" and got[1] is None else 2
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
        assert held.payload["id"] == "held"
        held.ack()


def test_an_undecodable_file_is_set_aside_not_delivered(tmp_path):
    url = broker_url_for(tmp_path / "broker")
    publish(url, ["good"])
    (tmp_path / "broker" / "messages" / "work" / f"{0:020d}_{'0' * 32}.work.msg").write_bytes(b'{"trunc')  # sorts first
    with Connection(url) as conn:
        assert Queue("work", Exchange("work"), "work")(conn.channel()).get(no_ack=True).payload["id"] == "good"
    assert len(files(tmp_path / "broker" / "corrupt")) == 1


def test_sweep_removes_stale_fanout_messages_but_never_task_messages(tmp_path):
    url = broker_url_for(tmp_path / "broker")
    messages = tmp_path / "broker" / "messages"
    events = Queue("events.node1", Exchange("events", type="fanout"), auto_delete=True, durable=False)
    tasks = Queue("tasks", Exchange("tasks"), "tasks")
    options = {"transient_message_ttl": 0.3}
    publish(url, ["e1", "e2"], events, **options)
    publish(url, ["t1", "t2"], tasks, **options)
    # what a producer killed mid-write leaves behind
    (messages / "tasks" / f".{time.time_ns():020d}_{'0' * 32}.tasks.msg.4242.0badcafe.tmp").write_bytes(b"{")
    time.sleep(0.5)
    publish(url, ["e3"], events, **options)  # its channel opening sweeps

    names = ready(messages)
    assert len([n for n in names if n.endswith(".events.node1.msg")]) == 1
    assert len([n for n in names if n.endswith(".tasks.msg")]) == 2
    assert not [n for n in names if n.endswith(".tmp")]


def celery_client(url):
    app = Celery("client", broker=url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    return app


def start_worker(spawn, tmp_path, url, log_name, *extra):
    (tmp_path / "tinyapp.py").write_text(TINY_APP)
    return spawn([sys.executable, "-m", "celery", "-A", "tinyapp", "worker", "--pool=prefork", "-c", "2",
                  "-n", "tiny@%h", "--without-mingle", "--without-gossip", "-l", "info", *extra],
                 log_name, TINY_BROKER_URL=url, TINY_DONE=str(tmp_path / "done"))


def test_celery_worker_runs_tasks_answers_control_and_emits_events(tmp_path, spawn):
    url = broker_url_for(tmp_path / "broker")
    client = celery_client(url)
    start_worker(spawn, tmp_path, url, "worker.log", "-E")
    dump = tmp_path / "events.log"
    spawn([sys.executable, "-m", "celery", "-A", "tinyapp", "events", "--dump"], "events.log",
          TINY_BROKER_URL=url, TINY_DONE="")

    wait_until(lambda: client.control.ping(timeout=0.5), 30, "the worker to answer ping")
    queues = client.control.inspect(timeout=1).active_queues()
    assert [q["name"] for q in next(iter(queues.values()))] == ["celery"]
    wait_until(lambda: "heartbeat" in dump.read_text(), 15, "the event dump to see the worker")

    for n in range(5):
        client.send_task("tinyapp.record", args=[n])
    wait_until(lambda: sorted(lines(tmp_path / "done")) == list("01234"), 15, "the tasks")
    wait_until(lambda: dump.read_text().count("task succeeded") == 5, 15, "the task events")


def test_celery_worker_killed_mid_backlog_loses_no_task(tmp_path, spawn):
    url = broker_url_for(tmp_path / "broker")
    done = tmp_path / "done"
    client = celery_client(url)
    for n in range(60):
        client.send_task("tinyapp.record", args=[n])

    crashed = start_worker(spawn, tmp_path, url, "worker-1.log")
    wait_until(lambda: len(lines(done)) >= 10, 30, "the first worker to be mid-backlog")
    os.kill(crashed.pid, signal.SIGKILL)
    kill_group(crashed)  # its orphaned pool processes die with it
    assert len(set(lines(done))) < 60
    assert files(tmp_path / "broker" / "unacked"), "the crash left tasks unacknowledged"

    start_worker(spawn, tmp_path, url, "worker-2.log")
    wait_until(lambda: set(lines(done)) == {str(n) for n in range(60)}, 30, "every task after the restart")
    print(f"duplicates after the crash: {len(lines(done)) - 60}")


def test_the_event_queue_of_a_killed_events_consumer_goes_with_its_binding(tmp_path, spawn):
    """`celery events` killed with SIGKILL: its queue stops getting a copy of every event
    once the queue is older than the TTL; a live consumer's queue stays, however old."""
    url = broker_url_for(tmp_path / "broker")
    control, messages = tmp_path / "broker" / "control", tmp_path / "broker" / "messages"
    (tmp_path / "tinyapp.py").write_text(TINY_APP)

    def event_queues():
        table = control / "celeryev.exchange"
        return {queue for _, _, queue in json.loads(table.read_text())} if table.exists() else set()

    def start_events(log_name):
        before = event_queues()
        process = spawn([sys.executable, "-m", "celery", "-A", "tinyapp", "events", "--dump"], log_name,
                        TINY_BROKER_URL=url, TINY_DONE="")
        wait_until(lambda: event_queues() - before, 30, f"{log_name}'s event queue bound")
        return process, (event_queues() - before).pop()

    doomed, doomed_queue = start_events("doomed.log")
    live, live_queue = start_events("live.log")
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=10)

    app = celery_client(url)
    with app.connection_for_write() as connection:  # the default TTL: 5 min
        dispatcher = app.events.Dispatcher(connection, hostname="probe@test", enabled=True)

        def heartbeat():
            dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=0, loadavg=[0, 0, 0],
                            sw_ident="probe", sw_ver="1", sw_sys="Linux")
        heartbeat()
        assert [n for n in ready(messages) if n.endswith(f".{doomed_queue}.msg")], "copies go to the dead queue"

        time.sleep(0.6)
        # Both queues were declared longer than this TTL ago; a channel's opening housekeeps.
        with Connection(url, transport_options={"transient_message_ttl": 0.5}) as sweeper:
            sweeper.channel()
        heartbeat()

        assert event_queues() == {live_queue}
        assert not (control / f"{doomed_queue}.autodelete").exists()
        assert not [n for n in ready(messages) if n.endswith(f".{doomed_queue}.msg")]
        wait_until(lambda: (tmp_path / "live.log").read_text().count("probe@test") == 2, 15,
                   "the live consumer's copies")
    assert live.poll() is None
