"""The consumer of the guests' queue (``trove-conductor``): a bootstep of the conductor's
worker with a channel of its own, not a Celery task.

Each message passes dbaas.intake's checks as it arrives, in the consumer's thread; a
refused one is rejected at once, without requeue, with one log line, before any database
work. Accepted messages — heartbeats and backup updates — wait unacknowledged and are
written many per transaction: up to ``heartbeat_batch_size`` of them, or whatever arrived
within ``heartbeat_batch_interval``. Only after that transaction committed are they
acknowledged, on RabbitMQ with one ``basic.ack(multiple=True)`` for the whole batch.
In the worker's event loop (RabbitMQ, prefork pool) each batch's transaction runs in one
of the worker's pool processes, one batch at a time (batches apply in arrival order),
while the main process goes on receiving and checking the next; the outcome comes back
through the loop, and deliveries are settled by the main process only.
A worker that dies before then hands them back to the broker. While the database is away
the batch is kept and retried with backoff; the channel's prefetch limit stops the buffer
from growing meanwhile.

Nothing a guest sends makes the conductor publish anything: there are no callbacks,
retries or replies on this path.
"""

import logging
import time
from dataclasses import dataclass
from functools import partial

from celery import bootsteps
from celery.concurrency.prefork import TaskPool as PreforkPool
from kombu import Consumer

from dbaas import db, intake, settings, wire
from dbaas.models import utcnow
from dbaas.queues import queue
from workers.conductor import auth, backups, heartbeats, metrics
from workers.conductor.messages import MessageRejected

log = logging.getLogger(__name__)

GUEST_TASKS = wire.GUEST_TASKS


@dataclass
class Delivery:
    message: object
    task: intake.TaskMessage


@dataclass
class Outcome:
    """What one batch did: per message None (applied, or stale and discarded) or
    (kind, reason) of its refusal; and how many heartbeats and backup updates applied."""
    verdicts: list
    heartbeats_applied: int = 0
    backups_applied: int = 0


def apply_batch(session, tasks: list[intake.TaskMessage], now=None) -> Outcome:
    """The signatures were checked on arrival; here: are the senders' credentials still
    live, then heartbeats in one pass and each backup update in a savepoint of its own (a
    refused one is rolled back alone). Heartbeats first and backups in id order, so two
    conductors' batches take their row locks in the same order."""
    now = now or utcnow()
    outcome = Outcome([None if refusal is None else ("revoked", refusal)
                       for refusal in auth.refuse_revoked(session, [t.principal for t in tasks])])
    verdicts = outcome.verdicts
    beats = [i for i, task in enumerate(tasks) if verdicts[i] is None and task.task == wire.HEARTBEAT_TASK]
    beat_verdicts, outcome.heartbeats_applied = heartbeats.handle(session, [tasks[i] for i in beats], now)
    for index, refusal in zip(beats, beat_verdicts):
        verdicts[index] = None if refusal is None else ("invalid", refusal)
    updates = []
    for index, task in enumerate(tasks):
        if verdicts[index] is None and task.task == wire.UPDATE_BACKUP_TASK:
            try:
                updates.append((backups.parse_update(task.args, task.kwargs), index))
            except MessageRejected as exc:
                verdicts[index] = ("invalid", str(exc))
    for change, index in sorted(updates, key=lambda item: (item[0].backup_id, item[0].sent)):
        try:
            with session.begin_nested():
                outcome.backups_applied += backups.apply_update(session, change, now)
        except MessageRejected as exc:
            verdicts[index] = ("invalid", str(exc))
    return outcome


def run_batch(rows: list[tuple]) -> tuple:
    """A batch's transaction, in a pool process (or inline): ``rows`` are the checked
    messages as plain values, and so is the answer: ((verdicts, heartbeats applied,
    backups applied), None), or (None, why it was not written: the database is away)."""
    tasks = [intake.TaskMessage(task, task_id, args, kwargs, intake.Principal(instance_id, generation))
             for task, task_id, args, kwargs, instance_id, generation in rows]
    try:
        outcome = _run_batch(tasks)
    except Exception as exc:
        if not db.is_retryable(exc):
            raise
        return None, f"database unavailable ({exc})"
    return (outcome.verdicts, outcome.heartbeats_applied, outcome.backups_applied), None


def _run_batch(tasks: list[intake.TaskMessage]) -> Outcome:
    """The whole batch in one transaction; when that fails for another reason than the
    database being away, each message alone, so one bad message cannot block the others."""
    try:
        return _run(tasks)
    except Exception as exc:
        if db.is_retryable(exc):
            raise
        log.exception("guests' queue: batch of %d failed; applying one by one", len(tasks))
    total = Outcome([])
    for task in tasks:
        alone = _run_alone(task)
        total.verdicts += alone.verdicts
        total.heartbeats_applied += alone.heartbeats_applied
        total.backups_applied += alone.backups_applied
    return total


def _run(tasks: list[intake.TaskMessage]) -> Outcome:
    return db.run_transaction(lambda session: apply_batch(session, tasks), retry_for=0)


def _run_alone(task: intake.TaskMessage) -> Outcome:
    try:
        return _run([task])
    except Exception as exc:
        if db.is_retryable(exc):
            raise
        log.exception("%s[%s] failed", task.task, task.id)
        return Outcome([("failed", f"failed: {type(exc).__name__}")])


def prefetch_count(config) -> int:
    """Deliveries the guests' consumer holds unacknowledged: a batch committing, a full one
    waiting for it, and room to go on receiving meanwhile (with two, the main process
    stood idle until the commit's acknowledgement let RabbitMQ send more)."""
    return 3 * config.heartbeat_batch_size


class GuestQueue(bootsteps.ConsumerStep):
    """Started by every conductor worker that consumes the guests' queue (dbaas.celery
    hands that queue to this step rather than to Celery's task consumer)."""

    def start(self, c):
        from dbaas import celery as dbaas_celery
        self.batcher = None
        if dbaas_celery.guest_queue is None:
            return
        self.c = c
        super().start(c)

    def get_consumers(self, channel):
        config = settings.get()
        # Per consumer, never global (quorum queues refuse a global prefetch).
        channel.basic_qos(0, prefetch_count(config), False)
        self.batcher = Batcher(self.c, channel, config)
        # on_decode_error: a message kombu could not even build (see dbaas.intake) is refused
        # through the same checks instead of raised through the worker.
        return [Consumer(channel, queues=[queue(config.conductor_queue, config.queue_type)], no_ack=False,
                         on_message=self.batcher.on_message,
                         on_decode_error=lambda message, _exc: self.batcher.on_message(message))]

    def stop(self, c):
        if self.batcher:
            # Unacknowledged deliveries go back when the channel closes; a transaction
            # under way still ends, and its answer is ignored.
            self.batcher.forget()
        super().stop(c)

    def shutdown(self, c):
        if self.batcher:
            self.batcher.forget()
        super().shutdown(c)


class Batcher:
    def __init__(self, consumer, channel, config):
        self.consumer = consumer
        self.size = config.heartbeat_batch_size
        self.interval = config.heartbeat_batch_interval
        self.max_bytes = config.max_message_bytes
        self.service_key = config.service_key
        self.errors = consumer.connection_errors
        # Only AMQP acknowledges many deliveries at once; kombu's virtual transports (the
        # embedded broker) take one tag per ack.
        rabbitmq = channel.connection.client.transport.driver_type == "amqp"
        self.ack_many = rabbitmq
        # RabbitMQ checks a message's user_id against the publishing connection's user:
        # requiring it to be the instance's own broker user means the broker vouches for
        # the sender, besides the signature. The embedded broker has no users.
        self.require_user_id = rabbitmq and config.require_guest_user_id
        self.pending: list[Delivery] = []
        self.flush_soon = False
        self.in_flight = False  # a batch's transaction runs (one at a time: batches apply in order)
        self.timer_armed = False
        self.retry_delay = 0.0
        self.generation = 0  # bumped by forget(): a timer armed or a transaction begun before is void
        # The pool's answers come back through the event loop. Without one (the embedded
        # broker's synchronous loop), or with another pool, transactions run inline.
        self.pool = consumer.pool if consumer.hub is not None and isinstance(consumer.pool, PreforkPool) else None

    def on_message(self, message) -> None:
        try:
            task = intake.check_task_message(message, tasks=GUEST_TASKS, max_bytes=self.max_bytes,
                                             service_key=self.service_key)
            if self.require_user_id and message.properties.get("user_id") != \
                    wire.guest_broker_user(task.principal.instance_id):
                raise intake.Refused("the broker does not vouch for the sender: its user_id is "
                                     "not the instance's own broker user", kind="user_id")
        except intake.Refused as exc:
            self.refuse(message, intake.describe(message), exc.kind, str(exc))
            return
        self.pending.append(Delivery(message, task))
        if len(self.pending) >= self.size and not self.retry_delay:
            if self.pool is None:
                self.flush()
            elif not self.flush_soon:
                # From the event loop, whose turns serve the pool's pipes: messages also
                # arrive while the worker still starts, before the pool can take a job.
                self.flush_soon = True
                self.consumer.hub.call_soon(self._flush_now, self.generation)
        elif not self.timer_armed:
            self._arm(self.interval)

    def forget(self) -> None:
        self.pending = []
        self.flush_soon = False
        self.in_flight = False
        self.generation += 1
        self.timer_armed = False

    def _arm(self, delay: float) -> None:
        self.timer_armed = True
        generation = self.generation
        if self.consumer.hub is not None:
            # The hub's timer fires inside the consumer's loop: flush right there.
            # (Hub.call_soon from the loop's own thread would not wake it: the batch
            # would wait for the next message or an unrelated timer.)
            self.consumer.timer.call_after(delay, self._on_timer, (generation,))
        else:
            # A timer thread: hand the flush to the consumer's thread.
            self.consumer.timer.call_after(delay, self.consumer.call_soon, (self._on_timer, generation))

    def _flush_now(self, generation: int) -> None:
        if generation == self.generation:
            self.flush_soon = False
            self.flush()

    def _on_timer(self, generation: int) -> None:
        if generation != self.generation:
            return
        self.timer_armed = False
        self.flush()

    def flush(self) -> None:
        """Start the transaction of the oldest pending messages, unless one runs already
        (then the next starts when it ends)."""
        if self.in_flight:
            return
        batch, self.pending = self.pending[:self.size], self.pending[self.size:]
        if not batch:
            return
        self.in_flight = True
        rows = [(t.task, t.id, t.args, t.kwargs, t.principal.instance_id, t.principal.generation)
                for t in (delivery.task for delivery in batch)]
        done = partial(self._done, self.generation, batch)
        if self.pool is None:
            done(run_batch(rows))
        else:
            self.pool.apply_async(run_batch, args=(rows,), callback=done,
                                  error_callback=lambda exc: done((None, f"the pool process failed: {exc!r}")))

    def _done(self, generation: int, batch: list[Delivery], answer: tuple) -> None:
        """In the consumer's thread, once a batch's transaction ended (see run_batch)."""
        if generation != self.generation:
            return  # its channel is gone, and with it these deliveries: the broker hands them out again
        self.in_flight = False
        result, unavailable = answer
        if unavailable is not None:
            # Kept, not lost: retried with backoff; the prefetch limit stops the intake meanwhile.
            self.pending = batch + self.pending
            self.retry_delay = min(max(self.retry_delay * 2, 0.1), 5.0)
            log.warning("guests' queue: batch not written: %s; %d messages kept, retry in %.1fs",
                        unavailable, len(self.pending), self.retry_delay)
            self._arm(self.retry_delay)
            return
        self.retry_delay = 0.0
        self._settle(batch, Outcome(*result))
        if not self.pending:
            return
        # Due now: a full batch, or one whose interval ran out while this one was applied.
        if len(self.pending) >= self.size or not self.timer_armed:
            self.flush()
        if self.pending and not self.timer_armed:
            self._arm(self.interval)

    def _settle(self, batch: list[Delivery], outcome: Outcome) -> None:
        """Refused ones rejected one by one, the rest acknowledged. Everything delivered
        before this batch is already settled (refused on arrival, or acknowledged with an
        earlier batch), so one multiple-ack of the newest accepted delivery settles
        exactly the accepted ones."""
        newest = None
        committed = time.time()
        accepted = {wire.HEARTBEAT_TASK: 0, wire.UPDATE_BACKUP_TASK: 0}
        latencies = []
        for delivery, verdict in zip(batch, outcome.verdicts):
            if verdict is None:
                newest = delivery
                accepted[delivery.task.task] += 1
                if not self.ack_many:
                    delivery.message.ack_log_error(log, self.errors)
                if delivery.task.task == wire.HEARTBEAT_TASK:
                    latencies.append(max(0.0, committed - delivery.task.args[2]))
            else:
                self.refuse(delivery.message, f"{delivery.task.task}[{delivery.task.id}]", *verdict)
        if newest is not None and self.ack_many:
            try:
                newest.message.ack(multiple=True)
            except self.errors:
                log.exception("acknowledging a batch failed: the broker redelivers it")
        metrics.batch_settled(len(batch), accepted, {wire.HEARTBEAT_TASK: outcome.heartbeats_applied,
                                                     wire.UPDATE_BACKUP_TASK: outcome.backups_applied},
                              latencies)

    def refuse(self, message, what: str, kind: str, reason: str) -> None:
        log.warning("refused %s on the guests' queue: %s", what, reason)
        metrics.refused(kind)
        message.reject_log_error(log, self.errors, requeue=False)

