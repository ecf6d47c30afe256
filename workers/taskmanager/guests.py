"""What the taskmanager tells and gives a guest: its configuration and signed commands.

A guest's secret is derived from the service key, the instance id and the generation of
its credentials (dbaas.signing.guest_secret): the taskmanager computes it when it writes
the guest's config and when it signs a command, and nothing secret crosses the broker.
"""

import os
import time

from kombu import Connection
from kombu.exceptions import KombuError

from dbaas import settings, signing
from dbaas.queues import queue
from workers.guestagent.api import GuestConfig, command_queue, send_command


class GuestUnreachable(Exception):
    """A command could not be handed to the broker for the guest."""


# A broker failing over refuses a publish for a moment — RabbitMQ nacks a message for a
# quorum queue whose leader just died, a dying node resets the connection — and kombu
# does not try again after a nack: ``send`` does, each time on a new connection (so on
# another node), before it gives up. Commands are idempotent for the agent.
SEND_ATTEMPTS = 4
SEND_BACKOFF = (0.5, 1.0, 2.0)


def backup_root() -> str:
    return os.path.join(settings.get().var_dir, "backups")


def secret(instance_id: str, generation: int) -> str:
    return signing.guest_secret(settings.get().service_key, instance_id, generation)


def config_for(instance_id: str, generation: int, datastore: str, broker_url: str) -> GuestConfig:
    """Everything but where its data lives, which the compute driver decides;
    ``broker_url`` holds the guest's own broker user (broker_users.py)."""
    config = settings.get()
    return GuestConfig(
        instance_id=instance_id, secret=secret(instance_id, generation), generation=generation,
        broker_url=broker_url, conductor_queue=config.conductor_queue,
        datastore=datastore, backup_root=backup_root(),
        heartbeat_interval=config.guest_heartbeat_interval)


def declare_queues(instance_id: str) -> None:
    """Everything a guest uses, declared by the control plane: the guest may configure
    nothing. Its command queue, and the conductor's exchange and queue it publishes to."""
    with Connection(settings.get().broker_url) as connection:
        channel = connection.default_channel
        queue_type = settings.get().queue_type
        for declared in (command_queue(instance_id, queue_type=queue_type),
                         queue(settings.get().conductor_queue, queue_type)):
            declared(channel).declare()


def commands_waiting(instance_id: str) -> int:
    """Commands in the guest's queue that no guest has taken yet."""
    with Connection(settings.get().broker_url) as connection:
        declared = command_queue(instance_id, queue_type=settings.get().queue_type)(connection.default_channel)
        return declared.queue_declare(passive=True).message_count


def delete_queues(instance_id: str) -> None:
    with Connection(settings.get().broker_url) as connection:
        command_queue(instance_id, queue_type=settings.get().queue_type)(connection.default_channel).delete()


def send(instance_id: str, generation: int, command: str, args: dict) -> None:
    for attempt in range(SEND_ATTEMPTS):
        try:
            send_command(settings.get().broker_url, instance_id, secret(instance_id, generation),
                         command, args, settings.get().queue_type)
            return
        except (OSError, KombuError) as exc:
            if attempt + 1 == SEND_ATTEMPTS:
                # A nack's error says nothing by itself: name its cause.
                why = str(exc) or repr(exc.__cause__ or exc)
                raise GuestUnreachable(f"cannot send {command} to the guest of {instance_id}: {why}") from exc
            time.sleep(SEND_BACKOFF[min(attempt, len(SEND_BACKOFF) - 1)])
        except ValueError as exc:  # not a command: trying again changes nothing
            raise GuestUnreachable(f"cannot send {command} to the guest of {instance_id}: {exc}") from exc
