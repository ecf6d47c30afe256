"""The consumer of every control-plane worker (``worker_consumer`` in celeryconfig): each
task message passes dbaas.intake's checks before Celery's request machinery, the task's
strategy or a pool process sees it.

Celery itself ends the worker process ("Unrecoverable error") on messages whose headers
are missing or of the wrong type, or whose arguments nest too deeply to pickle for a pool
child; the message, still unacknowledged, then ends the next worker too. Here such a
message is rejected without requeue, with one log line saying why, and the worker goes on.
"""

import logging

from celery.worker.consumer import Consumer as CeleryConsumer
from vine import promise

from dbaas import intake, settings

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    class Blueprint(CeleryConsumer.Blueprint):
        # The product sends no ETA or countdown (the intake refuses them), so quorum
        # queues need none of the delayed-delivery topology Celery would otherwise declare
        # (some thirty extra quorum queues per vhost).
        default_steps = [step for step in CeleryConsumer.Blueprint.default_steps
                         if not step.endswith(":DelayedDelivery")]

    def create_task_handler(self, promise=promise):
        handle = super().create_task_handler(promise)
        config = settings.get()
        settled_errors = tuple(self.connection_errors) + tuple(self.channel_errors)

        def on_task_received(message):
            try:
                intake.check_task_message(message, tasks=self.strategies,
                                          max_bytes=config.max_message_bytes,
                                          service_key=config.service_key)
            except intake.Refused as exc:
                refuse(message, str(exc))
                return
            try:
                handle(message)
            except settled_errors:
                raise
            except Exception as exc:  # whatever slipped past the checks must not end the worker
                log.exception("handling message %s failed", intake.describe(message))
                if not message.acknowledged:
                    refuse(message, f"{type(exc).__name__}: {str(exc)[:200]}")

        def refuse(message, reason: str) -> None:
            info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
            log.warning("refused message %s on %s: %s", intake.describe(message),
                        info.get("routing_key"), reason)
            message.reject_log_error(log, self.connection_errors, requeue=False)

        return on_task_received

