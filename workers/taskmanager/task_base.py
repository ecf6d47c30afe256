"""The base of taskmanager tasks: only the control plane may call them.

Any guest can publish to any queue of the broker, so a message on the taskmanager's queue
proves nothing by itself; it must be signed with the service key, which guests never hold.
Checked without a database: the service key is a setting.
"""

import logging

from celery import Task
from celery.exceptions import Reject

from dbaas import settings, signing, wire

log = logging.getLogger(__name__)


class TaskmanagerTask(Task):
    typing = False

    def __call__(self, *args, **kwargs):
        try:
            signing.verify_service(settings.get().service_key,
                                   getattr(self.request, wire.AUTH_HEADER, None), self.name, args, kwargs,
                                   callee="taskmanager")
        except signing.AuthError as exc:
            log.warning("rejected %s %s: unauthenticated: %s", self.name, self.request.id, exc)
            raise Reject(str(exc), requeue=False) from None
        return self.run(*args, **kwargs)
