"""The conductor's Celery app plus one do-nothing task: the floor of Celery's own cost.

Started exactly like the conductor, only with ``-A bench.noop_app``:

    celery -A bench.noop_app worker -Q trove-conductor

``conductor.noop`` is routed by the app's own ``conductor.*`` route to the conductor
queue, so ``dbaas.celery.keep_only_consumed_tasks`` keeps it registered. The task does
nothing except, when ``BENCH_NOOP_COUNTER`` names a file, append one byte to it (a few
microseconds) so the benchmark can count completions without the result backend or
events.
"""

import os

from dbaas.celery import app

__all__ = ["app", "noop"]

_counter_fd = None


@app.task(name="conductor.noop")
def noop(*_args, **_kwargs):
    global _counter_fd
    path = os.environ.get("BENCH_NOOP_COUNTER")
    if not path:
        return
    if _counter_fd is None:  # per pool process, opened on first use
        _counter_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(_counter_fd, b".")
