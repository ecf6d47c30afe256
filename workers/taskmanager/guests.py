"""What the taskmanager tells and gives a guest: its configuration and signed commands.

A guest's secret is derived from the service key, the instance id and the generation of
its credentials (dbaas.signing.guest_secret): the taskmanager computes it when it writes
the guest's config and when it signs a command, and nothing secret crosses the broker.
"""

import os

from kombu.exceptions import KombuError

from dbaas import settings, signing
from workers.guestagent.api import GuestConfig, send_command


class GuestUnreachable(Exception):
    """A command could not be handed to the broker for the guest."""


def backup_root() -> str:
    return os.path.join(settings.get().var_dir, "backups")


def secret(instance_id: str, generation: int) -> str:
    return signing.guest_secret(settings.get().service_key, instance_id, generation)


def config_for(instance_id: str, generation: int, datastore: str) -> GuestConfig:
    """Everything but where its data lives, which the compute driver decides."""
    config = settings.get()
    return GuestConfig(
        instance_id=instance_id, secret=secret(instance_id, generation), generation=generation,
        broker_url=config.broker_url, conductor_queue=config.conductor_queue,
        datastore=datastore, backup_root=backup_root(),
        heartbeat_interval=config.guest_heartbeat_interval)


def send(instance_id: str, generation: int, command: str, args: dict) -> None:
    try:
        send_command(settings.get().broker_url, instance_id, secret(instance_id, generation),
                     command, args)
    except (OSError, ValueError, KombuError) as exc:
        raise GuestUnreachable(f"cannot send {command} to the guest of {instance_id}: {exc}") from exc
