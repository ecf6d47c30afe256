"""The Celery app of the control-plane processes (conductor, taskmanager, beat, Flower).

Guests never import this module: they hold no service key and no database settings.
"""

import sys

from celery import Celery, signals

from dbaas import settings, signing, wire

app = Celery("dbaas")
app.config_from_object("celeryconfig")


@signals.before_task_publish.connect
def sign_as_service(sender=None, body=None, headers=None, **_):
    """Everything the control plane publishes proves it came from the control plane."""
    if headers is None or wire.AUTH_HEADER in headers:
        return
    args, kwargs, _embed = body
    headers[wire.AUTH_HEADER] = signing.auth_header(
        signing.SERVICE_PRINCIPAL, settings.get().service_key, sender, args, kwargs)


@signals.celeryd_init.connect
def import_consumed_task_modules(options=None, **_):
    """A worker imports only the task modules of the queues it consumes (all when no -Q
    is given): a taskmanager never loads the conductor and its database layer."""
    config = settings.get()
    modules = {config.conductor_queue: "workers.conductor.tasks",
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
    """A worker runs only the tasks routed to queues it consumes.

    Celery's built-in tasks (``celery.map``, ``celery.chord_unlock``…) would let anyone
    who can publish make a worker call other tasks, and a taskmanager must not run
    conductor tasks (it has no database) if a message is misrouted to it.
    """
    consumed = set(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    for name in list(instance.app.tasks):
        route = instance.app.amqp.router.route({}, name)
        if name.startswith("celery.") or route["queue"].name not in consumed:
            instance.app.tasks.unregister(name)


@signals.worker_process_init.connect
def dispose_inherited_engine(**_):
    if "dbaas.db" in sys.modules:  # only processes that use the database have an engine
        sys.modules["dbaas.db"].dispose_after_fork()
