"""Casts and calls between control-plane roles: Celery messages sent by name, signed with
the service key by the code that means to send them (never by a publish hook: a message a
worker publishes because another message asked it to must not carry the service's
authority).

A call waits for its answer through Celery's ``rpc://`` result backend (a reply queue per
client thread, managed by kombu). Answers are data, ``{"result": …}`` or
``{"error": {"kind", "message"}}`` (dbaas.errors), never pickled exceptions.
"""

from celery import Celery
from celery.backends.rpc import RPCBackend
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.common import maybe_declare
from kombu.exceptions import KombuError, OperationalError

from dbaas import errors, settings, signing, wire


class ReplyBackend(RPCBackend):
    """Celery's rpc backend with reply queues that are not durable. A durable classic
    queue lives on one RabbitMQ node: while that node was down, RabbitMQ refused to
    declare the caller's reply queue again, and every call from that thread failed until
    the node returned. A transient one is declared anew on a node that is up. Replies are
    only ever awaited by a live caller, so nothing is lost that durability kept."""

    @property
    def binding(self):
        return self.Queue(self.oid, self.exchange, self.oid, durable=False, auto_delete=True,
                          expires=self.expires)

    def on_task_call(self, producer, task_id):
        """The reply queue exists before the request leaves, in a pool process too. Celery
        skips this there, taking the queue to exist already; a fresh pool process declared
        it only when it began to wait, and an answer quicker than that (the conductor's
        take ~10 ms) went to no queue: RabbitMQ dropped it and the call timed out."""
        maybe_declare(self.binding(producer.channel), retry=True)


def service_headers(task_name: str, args: list, kwargs: dict) -> dict:
    return {wire.AUTH_HEADER: signing.auth_header(
        signing.SERVICE_PRINCIPAL, settings.get().service_key, task_name, args, kwargs)}


class Client:
    """The sending half of one role's API (``workers/<role>/api.py`` subclasses it)."""

    def __init__(self, app: Celery, timeout: float | None = None):
        self.app = app
        self.timeout = settings.get().call_timeout if timeout is None else timeout

    def cast(self, task_name: str, *args, **kwargs) -> None:
        """Send and return once the broker has the message."""
        self._send(task_name, list(args), kwargs, ignore_result=True)

    def call(self, task_name: str, *args, **kwargs):
        """Send and wait for the answer; raise the answer's error, or Unavailable when
        none came in time. The message expires with the wait, so a request nobody
        answered is not carried out later behind the caller's back."""
        result = self._send(task_name, list(args), kwargs, ignore_result=False,
                            expires=self.timeout)
        try:
            # Allowed inside a task (the taskmanager's reconcile asks the conductor): the
            # answer comes from another worker, so waiting for it cannot deadlock this one.
            reply = result.get(timeout=self.timeout, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeout:
            raise errors.Unavailable(
                f"no conductor answered within {self.timeout:g} s: is one running?") from None
        if not result.successful() or not isinstance(reply, dict):
            # On one line: an exception's text (a database error quoting SQL) may span several.
            detail = " ".join(str(reply).split())[:300]
            raise errors.DbaasError(f"{task_name} failed in the conductor: {detail}")
        if "error" in reply:
            raise errors.from_reply(reply["error"])
        return reply.get("result")

    def _send(self, task_name: str, args: list, kwargs: dict, **options):
        try:
            return self.app.send_task(task_name, args=args, kwargs=kwargs,
                                      headers=service_headers(task_name, args, kwargs), **options)
        except (OperationalError, KombuError, OSError) as exc:
            raise errors.Unavailable(f"broker unreachable: {exc}") from None
