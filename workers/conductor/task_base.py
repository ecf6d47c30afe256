"""The bases of conductor tasks handled one message at a time: size guard, authentication,
one transaction per run, and for calls an answer that is data.

A cast that is refused is rejected without requeue, with a log line saying why; while the
database is away it is retried with backoff, and past ``db_retry_seconds`` the message
goes back to the queue rather than being lost. A call answers ``{"result": …}`` or
``{"error": …}`` (dbaas.errors); its caller waits only ``call_timeout``, so it retries the
database no longer than that and then answers that the database is unavailable.
"""

import inspect
import logging

from celery import Task
from celery.exceptions import InvalidTaskError, Reject
from celery.worker.request import Request

from dbaas import db, errors, settings, wire
from workers.conductor import auth
from workers.conductor.messages import MessageRejected

log = logging.getLogger(__name__)
SCHEMA_MISSING = ("the control-plane database has no schema or an old one: "
                  "run `python manage.py db upgrade`")


class GuardedRequest(Request):
    """Refuses an oversized message before the task sees it (Celery logs and rejects)."""

    def __init__(self, message, **kwargs):
        limit = settings.get().max_message_bytes
        if len(message.body) > limit:
            raise InvalidTaskError(f"message of {len(message.body)} bytes exceeds the {limit}-byte limit")
        super().__init__(message, **kwargs)


class ConductorTask(Task):
    """A cast: ``run(session, principal, *args, **kwargs)`` inside one transaction."""

    Request = GuardedRequest
    typing = False

    def _run_authenticated(self, args, kwargs, retry_for: float | None):
        header = getattr(self.request, wire.AUTH_HEADER, None)

        def work(session):
            principal = auth.authenticate(session, self.name, args, kwargs, header)
            try:
                inspect.signature(self.run).bind(session, principal, *args, **kwargs)
            except TypeError as exc:
                raise MessageRejected(f"bad arguments: {exc}") from None
            return self.run(session, principal, *args, **kwargs)

        return db.run_transaction(work, retry_for=retry_for)

    def __call__(self, *args, **kwargs):
        try:
            return self._run_authenticated(args, kwargs, None)
        except (MessageRejected, errors.DbaasError) as exc:
            log.warning("rejected %s %s: %s", self.name, self.request.id, exc)
            raise Reject(str(exc), requeue=False) from None
        except Exception as exc:
            if not db.is_retryable(exc):
                raise
            log.error("%s %s: database unavailable for %.0fs; returning the message to the queue",
                      self.name, self.request.id, settings.get().db_retry_seconds)
            raise Reject(str(exc), requeue=True) from None


class ConductorCall(ConductorTask):
    """A call: the same, and the caller gets the answer through the result backend."""

    ignore_result = False

    def __call__(self, *args, **kwargs):
        try:
            return {"result": self._run_authenticated(args, kwargs, settings.get().call_timeout)}
        except MessageRejected as exc:
            # Not authenticated or malformed: no answer (it may not even come from a caller).
            log.warning("rejected %s %s: %s", self.name, self.request.id, exc)
            raise Reject(str(exc), requeue=False) from None
        except errors.DbaasError as exc:
            return errors.to_reply(exc)
        except Exception as exc:
            if db.schema_missing(exc):
                log.error("%s %s: %s", self.name, self.request.id, SCHEMA_MISSING)
                return errors.to_reply(errors.Unavailable(SCHEMA_MISSING))
            if not db.is_retryable(exc):
                raise
            log.error("%s %s: database unavailable", self.name, self.request.id)
            return errors.to_reply(errors.Unavailable(f"database unavailable: {type(exc).__name__}"))
