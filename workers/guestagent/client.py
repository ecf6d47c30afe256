"""Sends conductor messages by name, signed with this instance's secret."""

import time

from celery import Celery

import dbaas.broker  # noqa: F401  registers the embedded broker's URL scheme
from dbaas import signing, wire
from dbaas.queues import queue
from workers.guestagent.config import GuestConfig

GUEST_AGENT_VERSION = "1.0"


class ConductorClient:
    def __init__(self, config: GuestConfig):
        self.config = config
        self.principal = signing.instance_principal(config.instance_id)
        self.app = Celery("guestagent", broker=config.broker_url, set_as_current=False)
        self.app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_queues=[queue(config.conductor_queue)],
            task_routes={"conductor.*": {"queue": config.conductor_queue}},
            broker_transport_options={"confirm_publish": True, "polling_interval": 0.05},
            broker_connection_retry_on_startup=True,
        )

    def send(self, task_name: str, args: list, kwargs: dict | None = None) -> None:
        kwargs = kwargs or {}
        header = signing.auth_header(self.principal, self.config.secret, task_name, args, kwargs)
        self.app.send_task(task_name, args=args, kwargs=kwargs, headers={wire.AUTH_HEADER: header})

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
