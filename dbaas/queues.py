"""Queue and routing declarations shared by control-plane processes and guests.

A publisher that declares a queue must declare it with the same arguments as its
consumers, so both sides take them from here. Depends on kombu only (guests import it).
"""

from kombu import Exchange, Queue


def queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)


def routes(conductor_queue: str, taskmanager_queue: str) -> dict:
    return {
        "conductor.*": {"queue": conductor_queue},
        "taskmanager.*": {"queue": taskmanager_queue},
    }
