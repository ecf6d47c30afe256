"""Celery configuration of every control-plane process; values come from dbaas.settings."""

import dbaas.broker  # noqa: F401  registers the embedded broker's URL scheme
from dbaas import rpc, settings
from dbaas.broker import rabbitmq
from dbaas.queues import queue, routes
from workers.conductor.api import SWEEP
from workers.taskmanager.api import RECONCILE

_settings = settings.get()

broker_url = _settings.broker_url
# RabbitMQ read a buffer at a time rather than three system calls per frame.
broker_transport = rabbitmq.transport_for(broker_url)
broker_connection_retry_on_startup = True
# Publisher confirms on RabbitMQ: send_task returns only once the broker has the message.
broker_transport_options = {"confirm_publish": True, "polling_interval": 0.05}

# Calls wait for their answer on a reply queue of their own (one per client thread),
# which kombu declares and removes; casts ask for no answer.
result_backend = "dbaas.rpc:ReplyBackend"
result_persistent = False
task_ignore_result = True

# Guests write to the conductor queue: JSON only, never pickle.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"

# At-least-once: acknowledge after the task ran; a worker that dies hands its messages back.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 4
worker_hijack_root_logger = True
worker_send_task_events = True
# Every message is checked (dbaas.intake) before Celery's machinery sees it.
worker_consumer = "dbaas.worker:Consumer"
task_send_sent_event = False

# Declared alike by every publisher and consumer (quorum queues with DBAAS_QUEUE_TYPE).
task_queues = [queue(name, _settings.queue_type) for name in (
    _settings.conductor_queue, _settings.conductor_control_queue, _settings.taskmanager_queue)]
task_default_queue = _settings.conductor_control_queue
task_routes = routes(_settings.conductor_queue, _settings.conductor_control_queue,
                     _settings.taskmanager_queue)

# Exactly one `celery -A dbaas beat`; the sweep and the reconcile are idempotent, so a
# second one is harmless. Their messages are signed here, once: beat sends nothing else.
# A reconcile not taken before the next one is due is dropped (a taskmanager that was
# away would otherwise run every missed one when it is back).
beat_schedule = {
    "timeout-sweep": {"task": SWEEP, "schedule": _settings.sweep_interval,
                      "options": {"headers": rpc.service_headers(SWEEP, [], {}),
                                  "ignore_result": True}},
    "guest-reconcile": {"task": RECONCILE, "schedule": _settings.reconcile_interval,
                        "options": {"headers": rpc.service_headers(RECONCILE, [], {}),
                                    "ignore_result": True, "expires": _settings.reconcile_interval}},
}
beat_schedule_filename = f"{_settings.var_dir}/celerybeat-schedule"
