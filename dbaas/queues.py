"""Queue and routing declarations shared by control-plane processes and guests.

A publisher that declares a queue must declare it with the same arguments as its
consumers, so both sides take them from here. Depends on kombu only (guests import it).

Each queue has a direct exchange of its own: a guest is allowed to publish to the
conductor's exchange only, so it cannot reach the control queue or the taskmanager.
"""

from kombu import Exchange, Queue

from dbaas import wire

QUEUE_TYPES = ("classic", "quorum")
# On a quorum queue, a message delivered this many times without being settled is dropped:
# one that ends every consumer it reaches cannot go on doing so.
DELIVERY_LIMIT = 10


def arguments(queue_type: str) -> dict | None:
    """The declaration arguments of a queue of that type (``DBAAS_QUEUE_TYPE``); every
    publisher and consumer that declares a queue must use the same."""
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"unknown queue type {queue_type!r}")
    if queue_type == "classic":
        return None
    return {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}


def queue(name: str, queue_type: str = "classic") -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True,
                 queue_arguments=arguments(queue_type))


def routes(conductor_queue: str, control_queue: str, taskmanager_queue: str) -> dict:
    """Guest tasks to the guests' queue; every other conductor task (control-plane calls
    and casts) to the control queue, which conductors always consume as well."""
    return {
        **{name: {"queue": conductor_queue} for name in wire.GUEST_TASKS},
        "conductor.*": {"queue": control_queue},
        "taskmanager.*": {"queue": taskmanager_queue},
    }
