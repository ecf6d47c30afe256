"""The base of conductor tasks handled one message at a time: size guard, authentication
and one transaction per run."""

import inspect
import logging

from celery import Task
from celery.exceptions import InvalidTaskError, Reject
from celery.worker.request import Request

from dbaas import db, settings, wire
from workers.conductor import auth
from workers.conductor.messages import MessageRejected

log = logging.getLogger(__name__)


class GuardedRequest(Request):
    """Refuses an oversized message before the task sees it (Celery logs and rejects)."""

    def __init__(self, message, **kwargs):
        limit = settings.get().max_message_bytes
        if len(message.body) > limit:
            raise InvalidTaskError(f"message of {len(message.body)} bytes exceeds the {limit}-byte limit")
        super().__init__(message, **kwargs)


class ConductorTask(Task):
    """``run(session, principal, *args, **kwargs)`` inside one transaction.

    A refused message is rejected without requeue, with a log line saying why. While the
    database is away the run is retried with backoff; past ``db_retry_seconds`` the
    message goes back to the queue rather than being lost.
    """

    Request = GuardedRequest
    typing = False

    def __call__(self, *args, **kwargs):
        header = getattr(self.request, wire.AUTH_HEADER, None)

        def work(session):
            principal = auth.authenticate_one(session, self.name, args, kwargs, header)
            try:
                inspect.signature(self.run).bind(session, principal, *args, **kwargs)
            except TypeError as exc:
                raise MessageRejected(f"bad arguments: {exc}") from None
            return self.run(session, principal, *args, **kwargs)

        try:
            return db.run_transaction(work)
        except MessageRejected as exc:
            log.warning("rejected %s %s: %s", self.name, self.request.id, exc)
            raise Reject(str(exc), requeue=False) from None
        except Exception as exc:
            if not db.is_retryable(exc):
                raise
            log.error("%s %s: database unavailable for %.0fs; returning the message to the queue",
                      self.name, self.request.id, settings.get().db_retry_seconds)
            raise Reject(str(exc), requeue=True) from None
