"""Guests' side of a test: messages to the conductor in Celery's own format, signed as a
guest signs them, published fast (one producer, no confirms) for backlogs and floods."""

import uuid

from kombu import Connection, Producer

import dbaas.broker  # noqa: F401  registers the embedded broker's URL scheme
from dbaas import signing, wire
from dbaas.queues import queue
from workers.guestagent.client import guest_app


class Publisher:
    def __init__(self, broker_url: str, queue_name: str = "trove-conductor"):
        self.app = guest_app(broker_url, queue_name)  # builds Celery-format messages only
        self.queue = queue(queue_name)
        self.connection = Connection(broker_url, transport_options={"confirm_publish": False})
        channel = self.connection.channel()
        self.queue(channel).declare()
        self.producer = Producer(channel, exchange=self.queue.exchange,
                                 routing_key=self.queue.routing_key, serializer="json")

    def signed(self, task_name: str, args: list, secret: str, instance_id: str, generation: int = 1,
               kwargs: dict | None = None) -> None:
        kwargs = kwargs or {}
        header = signing.auth_header(signing.instance_principal(instance_id), secret, task_name,
                                     args, kwargs, generation=generation)
        self.raw_task(task_name, args, kwargs, {wire.AUTH_HEADER: header})

    def heartbeat(self, instance_id: str, secret: str, sent: float, status: str = "running") -> None:
        self.signed(wire.HEARTBEAT_TASK, [instance_id, {"service_status": status}, sent], secret,
                    instance_id)

    def raw_task(self, task_name: str, args: list, kwargs: dict, extra_headers: dict) -> None:
        message = self.app.amqp.as_task_v2(str(uuid.uuid4()), task_name, args, kwargs)
        self.producer.publish(message.body, headers={**message.headers, **extra_headers},
                              delivery_mode=2, **message.properties)

    def depth(self) -> int:
        """Messages ready in the queue."""
        return self.queue(self.connection.channel()).queue_declare(passive=True).message_count

    def close(self) -> None:
        self.connection.release()
        self.app.close()
