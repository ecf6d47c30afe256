"""Sends conductor messages by name, signed with an instance's secret."""

import time

from celery import Celery

import dbaas.broker  # noqa: F401  registers the embedded broker's URL scheme
from dbaas import signing, wire
from dbaas.queues import queue
from workers.guestagent.config import GuestConfig

GUEST_AGENT_VERSION = "1.0"


def guest_app(broker_url: str, conductor_queue: str) -> Celery:
    """A Celery app that can only publish to the conductor: no tasks, no database."""
    app = Celery("guestagent", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_queues=[queue(conductor_queue)],
        task_routes={"conductor.*": {"queue": conductor_queue}},
        broker_transport_options={"confirm_publish": True, "polling_interval": 0.05},
        broker_connection_retry_on_startup=True,
    )
    return app


def send_signed(app: Celery, instance_id: str, secret: str, generation: int, task_name: str,
                args: list, kwargs: dict | None = None) -> None:
    kwargs = kwargs or {}
    header = signing.auth_header(signing.instance_principal(instance_id), secret, task_name,
                                 args, kwargs, generation=generation)
    app.send_task(task_name, args=args, kwargs=kwargs, headers={wire.AUTH_HEADER: header})


class ConductorClient:
    def __init__(self, config: GuestConfig):
        self.config = config
        self.app = guest_app(config.broker_url, config.conductor_queue)

    def send(self, task_name: str, args: list, kwargs: dict | None = None) -> None:
        send_signed(self.app, self.config.instance_id, self.config.secret, self.config.generation,
                    task_name, args, kwargs)

    def heartbeat(self, service_status: str | None = None, sent: float | None = None,
                  **payload) -> None:
        payload.setdefault("guest_agent_version", GUEST_AGENT_VERSION)
        if service_status is not None:
            payload["service_status"] = service_status
        self.send(wire.HEARTBEAT_TASK, [self.config.instance_id, payload, sent or time.time()])

    def update_backup(self, backup_id: str, sent: float | None = None, **fields) -> None:
        self.send(wire.UPDATE_BACKUP_TASK,
                  [self.config.instance_id, backup_id, sent or time.time()], fields)

    def close(self) -> None:
        self.app.close()
