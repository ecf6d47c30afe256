"""Guests' side of a test: messages to the conductor exactly as a guest builds and signs
them (workers.guestagent.client.build_message), published fast — one producer, no
confirms — for backlogs and floods, or with any part of the message replaced."""

from kombu import Connection, Producer

import dbaas.broker  # noqa: F401  registers the embedded broker's URL scheme
from dbaas import wire
from dbaas.queues import queue
from workers.guestagent.client import build_message


class Publisher:
    def __init__(self, broker_url: str, queue_name: str = "trove-conductor"):
        self.queue = queue(queue_name)
        self.connection = Connection(broker_url, transport_options={"confirm_publish": False})
        channel = self.connection.channel()
        self.queue(channel).declare()
        self.producer = Producer(channel, exchange=self.queue.exchange,
                                 routing_key=self.queue.routing_key)

    def signed(self, task_name: str, args: list, secret: str, instance_id: str, generation: int = 1,
               kwargs: dict | None = None, **replace) -> None:
        """One message signed as the guest of ``instance_id``; ``replace`` overrides any
        publish argument (body, headers, content_type, reply_to, expiration…)."""
        message = build_message(instance_id, secret, generation, task_name, args, kwargs)
        self.producer.publish(**{**message, **replace})

    def heartbeat(self, instance_id: str, secret: str, sent: float, status: str = "running") -> None:
        self.signed(wire.HEARTBEAT_TASK, [instance_id, {"service_status": status}, sent], secret,
                    instance_id)

    def raw(self, body, **properties) -> None:
        self.producer.publish(body, **properties)

    def depth(self) -> int:
        """Messages ready in the queue."""
        return self.queue(self.connection.channel()).queue_declare(passive=True).message_count

    def close(self) -> None:
        self.connection.release()
