"""Queue and routing declarations shared by control-plane processes and guests.

A publisher that declares a queue must declare it with the same arguments as its
consumers, so both sides take them from here. Depends on kombu only (guests import it).

Each queue has a direct exchange of its own: a guest is allowed to publish to the
conductor's exchange only, so it cannot reach the control queue or the taskmanager.
"""

from kombu import Exchange, Queue

from dbaas import wire


def queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)


def routes(conductor_queue: str, control_queue: str, taskmanager_queue: str) -> dict:
    """Guest tasks to the guests' queue; every other conductor task (control-plane calls
    and casts) to the control queue, which conductors always consume as well."""
    return {
        **{name: {"queue": conductor_queue} for name in wire.GUEST_TASKS},
        "conductor.*": {"queue": control_queue},
        "taskmanager.*": {"queue": taskmanager_queue},
    }
