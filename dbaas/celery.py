"""The Celery app of the control-plane processes (conductor, taskmanager, beat, Flower,
the API and the CLI as clients).

Guests never import this module: they hold no service key and no database settings.
Nothing here signs what is published: each client module signs what it means to send
(dbaas.rpc), so a message published because another one asked for it (a callback, a
chain) carries no authority.
"""

import gc
import os
import sys

from celery import Celery, signals

from dbaas import settings

app = Celery("dbaas")
app.config_from_object("celeryconfig")

GC_YOUNG = 10_000  # objects allocated between two collections of the youngest generation

# Set in a conductor worker that consumes the guests' queue: that queue is handed to its
# own consumer (workers/conductor/consumer.py), not to Celery's task consumer.
guest_queue: str | None = None


@signals.celeryd_init.connect
def import_consumed_task_modules(options=None, **_):
    """A worker imports only the task modules of the queues it consumes (all when no -Q
    is given): a taskmanager never loads the conductor and its database layer."""
    config = settings.get()
    modules = {config.conductor_queue: "workers.conductor.tasks",
               config.conductor_control_queue: "workers.conductor.tasks",
               config.taskmanager_queue: "workers.taskmanager.tasks"}
    queues = (options or {}).get("queues") or list(modules)
    if isinstance(queues, str):
        queues = queues.split(",")
    for queue in queues:
        if queue in modules:
            # From the working directory, like Celery's own `imports` (the `celery`
            # script does not put it on sys.path).
            app.loader.import_task_module(modules[queue])


@signals.celeryd_after_setup.connect
def keep_only_consumed_tasks(sender=None, instance=None, **_):
    """A conductor also consumes the control queue, so that calls from the control plane
    never wait behind guests' heartbeats, and its guests' queue goes to a consumer of its
    own; and a worker runs only the tasks routed to the queues it consumes.

    Celery's built-in tasks (``celery.map``, ``celery.chord_unlock``…) would let anyone
    who can publish make a worker call other tasks, and a taskmanager must not run
    conductor tasks (it has no database) if a message is misrouted to it.
    """
    global guest_queue
    config = settings.get()
    queues = instance.app.amqp.queues
    if config.conductor_queue in (queues.consume_from or queues):
        queues.select_add(queues[config.conductor_control_queue])  # the declared one, arguments and all
        queues.deselect([config.conductor_queue])
        guest_queue = config.conductor_queue
    consumed = set(queues.consume_from or queues)
    for name in list(instance.app.tasks):
        route = instance.app.amqp.router.route({}, name)
        if name.startswith("celery.") or route["queue"].name not in consumed:
            instance.app.tasks.unregister(name)


@signals.worker_process_init.connect
def init_pool_process(**_):
    # A process group of its own: a signal meant for the worker — SIGTERM from honcho, a
    # service manager or a test, which signal the whole group — reaches only its main
    # process, which stops its pool in order (warm shutdown). A pool process killed by it
    # mid-task could die holding the pool's queue lock, and the main process then hung
    # in billiard's shutdown. The pool still ends its processes itself, and one whose
    # main process died sees its pipe close and exits.
    os.setpgrp()
    if "dbaas.db" in sys.modules:  # only processes that use the database have an engine
        sys.modules["dbaas.db"].dispose_after_fork()
    # Not collected first: that would write to every object shared with the main process,
    # copying their pages into this one.
    freeze_startup_objects(collect=False)


@signals.worker_ready.connect
def freeze_startup_objects(collect: bool = True, **_):
    """What a worker process made while starting (~100,000 objects: modules, the app, its
    connections) lives as long as the process: moved out of the cyclic collector's sight,
    so that a full collection walks only what came after. And a young generation of
    ``GC_YOUNG`` objects instead of 700: a message waiting in a batch (a few dozen objects)
    no longer survives collections, each promoting it towards the next full one.
    Measured in the conductor's main process at 3,000 heartbeats/s for 30 s: the collector
    took 2.7 s of its 22 s of CPU (1,543 collections, 13 full ones of ~120 ms, each a pause
    in receiving); frozen, 1.7 s; with this young generation too, 0.5 s (133, 4 full)."""
    if collect:
        gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
