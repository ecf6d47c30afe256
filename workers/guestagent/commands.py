"""Commands from the taskmanager to one guest agent: the wire format, both directions.

Each guest consumes its own durable queue ``guestagent.<instance id>`` bound to the direct
exchange ``guestagent`` with the instance id as routing key. A command is a JSON body
``{"command": NAME, "args": {...}}`` whose ``dbaas_auth`` header is an HMAC (dbaas.signing)
over ``guest.<NAME>`` and the args, keyed with that instance's own secret: only the control
plane and the guest know it, so no other tenant's guest can command this one.

Commands: prepare {port?, restore_location?, host?}, restart {}, backup {backup_id}, stop {},
reset_password {generation} (the administrator's password becomes that generation's).
"""

from kombu import Connection, Exchange, Producer, Queue

import dbaas.broker  # noqa: F401  registers the embedded broker's URL scheme
from dbaas import signing, wire
from dbaas.queues import arguments

EXCHANGE = Exchange("guestagent", type="direct", durable=True)
COMMANDS = frozenset({"prepare", "restart", "backup", "stop", "reset_password"})
# A command is a few hundred bytes: anything much larger is not one of ours.
COMMAND_MAX_BYTES = 65536


class CommandRefused(Exception):
    """Not a command this guest may carry out."""


def command_queue(instance_id: str, declare: bool = True, queue_type: str = "classic") -> Queue:
    """The guest consumes it with ``declare=False``: the control plane declares it (with
    its queue type), and a guest's broker user may configure nothing."""
    return Queue(f"guestagent.{instance_id}", EXCHANGE, routing_key=instance_id, durable=True,
                 no_declare=not declare, queue_arguments=arguments(queue_type))


def send_command(broker_url: str, instance_id: str, secret: str, command: str, args: dict,
                 queue_type: str = "classic") -> None:
    """Publish one command (declaring the guest's queue, so it waits for a guest that is
    still starting)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown guest command {command!r}")
    header = signing.auth_header(signing.SERVICE_PRINCIPAL, secret, f"guest.{command}", [], args)
    with Connection(broker_url, transport_options={"confirm_publish": True}) as connection:
        producer = Producer(connection.default_channel)
        producer.publish({"command": command, "args": args}, exchange=EXCHANGE,
                         routing_key=instance_id, declare=[command_queue(instance_id, queue_type=queue_type)],
                         serializer="json", headers={wire.AUTH_HEADER: header}, retry=True,
                         retry_policy={"max_retries": 5, "interval_start": 0.5,
                                       "interval_step": 1, "interval_max": 3})


def verify_command(secret: str, body, headers) -> tuple[str, dict]:
    """(command, args) of an authentic command, or CommandRefused saying why."""
    if not isinstance(body, dict) or set(body) != {"command", "args"} \
            or not isinstance(body["command"], str) or body["command"] not in COMMANDS \
            or not isinstance(body["args"], dict):
        raise CommandRefused("malformed command")
    command, args = body["command"], body["args"]
    try:
        signing.verify_service(secret, headers.get(wire.AUTH_HEADER) if isinstance(headers, dict) else None,
                               f"guest.{command}", [], args, callee="guest agent")
    except signing.AuthError as exc:
        raise CommandRefused(f"unauthenticated command: {exc}") from None
    return command, args
