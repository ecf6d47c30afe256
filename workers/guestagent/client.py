"""Sends conductor messages by name, signed with an instance's secret.

A message is a plain call in Celery's message format (protocol 2), built here rather than by
a Celery app: no reply address, no expiry, no callbacks — the conductor refuses a guest's
message that asks for any of those. Published to the conductor's exchange without declaring
anything (a guest holds no right to), with publisher confirms on RabbitMQ: ``send`` returns
only once the broker has the message, and raises when it could not be handed over.
"""

import json
import os
import socket
import time
import uuid

from kombu import Connection, Exchange, Producer

import dbaas.broker  # noqa: F401  registers the embedded broker's URL scheme
from dbaas import signing, wire
from workers.guestagent.config import GuestConfig

GUEST_AGENT_VERSION = "1.0"
ORIGIN = f"guest@{socket.gethostname()}:{os.getpid()}"


def build_message(instance_id: str, secret: str, generation: int, task_name: str, args: list,
                  kwargs: dict | None = None) -> dict:
    """The body, headers and properties of one signed task message (kombu publish kwargs)."""
    kwargs = kwargs or {}
    task_id = str(uuid.uuid4())
    # Only what the conductor reads: every header is decoded on its hottest path.
    headers = {
        "task": task_name, "id": task_id, "origin": ORIGIN,
        wire.AUTH_HEADER: signing.auth_header(signing.instance_principal(instance_id), secret,
                                              task_name, args, kwargs, generation=generation),
    }
    body = json.dumps([args, kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                      "chord": None}], allow_nan=False).encode()
    return {"body": body, "headers": headers, "correlation_id": task_id,
            "content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 2}


def broker_heartbeat(config: GuestConfig) -> int:
    """The AMQP heartbeat timeout (seconds) of a guest's broker connections. Without one,
    RabbitMQ never notices a connection whose guest went away with the network (a link
    cut): it keeps counting it against the guest's connection limit, and keeps the command
    it last delivered there unacknowledged, so that the guest, back, can neither connect
    nor get a command. Three of its own heartbeats: its reports keep the connection busy."""
    return max(10, round(3 * config.heartbeat_interval))


class ConductorClient:
    def __init__(self, config: GuestConfig, *, confirm: bool = True):
        self.config = config
        self.connection = Connection(config.broker_url, heartbeat=broker_heartbeat(config),
                                     transport_options={"confirm_publish": confirm})
        self.exchange = Exchange(config.conductor_queue, type="direct")
        # On RabbitMQ the message names its sender's broker user, which RabbitMQ checks
        # against the connection's: the conductor refuses a guest's message without it.
        self.user_id = (self.connection.userid
                        if self.connection.transport.driver_type == "amqp" else None)
        self._producer = None

    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self.connection.default_channel, exchange=self.exchange,
                                      routing_key=self.config.conductor_queue, auto_declare=False)
        return self._producer

    def send(self, task_name: str, args: list, kwargs: dict | None = None) -> None:
        message = build_message(self.config.instance_id, self.config.secret,
                                self.config.generation, task_name, args, kwargs)
        publish = self.connection.ensure(self, self._publish, max_retries=3,
                                         interval_start=0.2, interval_step=0.5, interval_max=1)
        publish(message)

    def _publish(self, message: dict) -> None:
        self.producer().publish(**message, user_id=self.user_id)

    def revive(self, channel) -> None:
        """kombu's ensure() calls this after reconnecting: publish on the new channel."""
        self._producer = None

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
        self.connection.release()
