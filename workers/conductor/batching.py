"""A Celery task type whose messages are written many per transaction.

One transaction per heartbeat tops out near PostgreSQL's single-row commit rate, far
below what guests can send. Here the worker's consumer keeps each message as it arrives
(unacknowledged), hands up to ``heartbeat_batch_size`` of them — or whatever arrived
within ``heartbeat_batch_interval`` — to the task in one transaction, and acknowledges
each message only after that transaction committed. A worker that dies before then
hands its messages back to the broker. While the database is away the batch is kept and
retried with backoff; the prefetch limit stops the buffer from growing meanwhile.

Everything runs in the consumer's own thread: kombu channels must not be shared between
threads.
"""

import logging
from dataclasses import dataclass

from celery import Task
from dbaas import db, settings, wire
from workers.conductor.messages import MessageRejected

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Envelope:
    """One decoded message as the batch function sees it."""
    task_id: str
    args: list
    kwargs: dict
    auth: object


def decode(message, max_bytes: int) -> Envelope:
    size = len(message.body)
    if size > max_bytes:
        raise MessageRejected(f"message of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        args, kwargs, _embed = message.decode()
    except Exception as exc:  # anything a hostile body can make a decoder raise
        raise MessageRejected(f"undecodable body: {type(exc).__name__}: {str(exc)[:200]}") from None
    return Envelope(str(message.headers.get("id"))[:64], args, kwargs,
                    message.headers.get(wire.AUTH_HEADER))


class BatchedTask(Task):
    """``run(session, envelopes)`` returns, per envelope, None (done) or why it is refused."""

    typing = False

    def Strategy(self, task, app, consumer):
        return _Batcher(task, consumer).on_message


class _Batcher:
    def __init__(self, task: BatchedTask, consumer):
        config = settings.get()
        self.task = task
        self.consumer = consumer
        self.size = config.heartbeat_batch_size
        self.interval = config.heartbeat_batch_interval
        self.max_bytes = config.max_message_bytes
        self.errors = consumer.connection_errors
        self.pending: list = []
        self.timer_armed = False
        self.retry_delay = 0.0
        self.prefetch_raised = False

    def on_message(self, message, _payload, _ack, _reject, _callbacks, **_):
        if not self.prefetch_raised:
            # Room for a whole batch on top of the worker's own prefetch.
            self.consumer.qos.increment_eventually(self.size)
            self.prefetch_raised = True
        try:
            envelope = decode(message, self.max_bytes)
        except MessageRejected as exc:
            self._refuse(message, message.headers.get("id"), str(exc))
            return
        self.pending.append((message, envelope))
        if len(self.pending) >= self.size and not self.retry_delay:
            self.flush()
        elif not self.timer_armed:
            self._arm(self.interval)

    def _arm(self, delay: float) -> None:
        self.timer_armed = True
        if self.consumer.hub is not None:
            # The hub's timer fires inside the consumer's loop: flush right there.
            # (Hub.call_soon from the loop's own thread would not wake it: the batch
            # would wait for the next message or an unrelated timer.)
            self.consumer.timer.call_after(delay, self._on_timer)
        else:
            # A timer thread: hand the flush to the consumer's thread.
            self.consumer.timer.call_after(delay, self.consumer.call_soon, (self._on_timer,))

    def _on_timer(self) -> None:
        self.timer_armed = False
        self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        envelopes = [envelope for _message, envelope in batch]
        try:
            verdicts = self._run_batch(envelopes)
        except Exception as exc:
            if not db.is_retryable(exc):
                raise
            self.pending = batch + self.pending
            self.retry_delay = min(max(self.retry_delay * 2, 0.1), 5.0)
            log.warning("%s: database unavailable (%s); %d messages kept, retry in %.1fs",
                        self.task.name, exc, len(self.pending), self.retry_delay)
            self._arm(self.retry_delay)
            return
        self.retry_delay = 0.0
        for (message, envelope), verdict in zip(batch, verdicts):
            if verdict is None:
                message.ack_log_error(log, self.errors)
            else:
                self._refuse(message, envelope.task_id, verdict)
        if self.pending and not self.timer_armed:
            self._arm(self.interval)

    def _run_batch(self, envelopes: list[Envelope]) -> list:
        """Verdicts for the whole batch; when the batch fails for another reason than
        the database being away, each message alone, so one bad message cannot block
        the others."""
        try:
            return self._run(envelopes)
        except Exception as exc:
            if db.is_retryable(exc):
                raise
            log.exception("%s: batch of %d failed; applying one by one", self.task.name, len(envelopes))
        return [self._run_alone(envelope) for envelope in envelopes]

    def _run(self, envelopes: list[Envelope]) -> list:
        return db.run_transaction(lambda session: self.task.run(session, envelopes), retry_for=0)

    def _run_alone(self, envelope: Envelope):
        try:
            return self._run([envelope])[0]
        except Exception as exc:
            if db.is_retryable(exc):
                raise
            log.exception("%s %s failed", self.task.name, envelope.task_id)
            return f"failed: {type(exc).__name__}"

    def _refuse(self, message, task_id, reason: str) -> None:
        log.warning("rejected %s %s: %s", self.task.name, task_id, reason)
        message.reject_log_error(log, self.errors, requeue=False)
