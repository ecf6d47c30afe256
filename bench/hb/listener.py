"""A process of its own (no GIL shared with the publisher) that records, while a phase
runs: each commit's time (a trigger in the bench database sends NOTIFY with the writing
transaction's id; NOTIFY is delivered at commit), and every 0.5 s the CPU split and the
guests' queue depth.

    python -m bench.hb.listener '<json config>'      (started by bench/heartbeats.py)

Output lines: ``C <txid> <time.time()>`` and ``S <time.time()> <ready> <runnable>
<cores per category...>``.
"""

import json
import select
import signal
import sys
import time

NOTIFY_CHANNEL = "bench_commit"


def main(config_json: str) -> None:
    import psycopg2
    from kombu import Connection

    from bench.hb.cpu import CATEGORIES, Accounting, pg_roles_query, runnable

    config = json.loads(config_json)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    conn = psycopg2.connect(**config["dsn"])
    conn.autocommit = True
    cursor = conn.cursor()
    cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
    cursor.execute("SELECT pg_backend_pid()")
    own = {cursor.fetchone()[0], *config["bench_backends"]}
    roles_cursor = conn.cursor()
    accounting = Accounting(config["conductor_pids"], [*config["bench_pids"], __import__("os").getpid()],
                            lambda: pg_roles_query(roles_cursor, config["database"], own),
                            rabbit_pid=config["rabbit_pid"], postmaster_pid=config["postmaster_pid"])
    broker = Connection(config["broker_url"])
    channel = broker.channel()
    last = time.time()
    with open(config["out"], "w") as sink:
        print("listening", flush=True)
        while not stop:
            if select.select([conn], [], [], 0.05)[0]:
                conn.poll()
                now = time.time()
                while conn.notifies:
                    sink.write(f"C {conn.notifies.pop(0).payload} {now!r}\n")
            now = time.time()
            if now - last >= 0.5:
                ready = channel.queue_declare(config["queue"], passive=True).message_count
                cores = accounting.delta()
                sink.write(f"S {now!r} {ready} {runnable()} "
                           + " ".join(f"{cores[k]:.3f}" for k in ("machine", *CATEGORIES)) + "\n")
                sink.flush()
                last = now
    broker.release()
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
