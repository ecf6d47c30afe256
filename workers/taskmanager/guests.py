"""Where an instance's files live on the control-plane host, and commands to its guest.

``manage.py instance create`` writes ``var/instances/<id>/guest.json``, which holds the
instance's secret; the taskmanager signs the commands it sends that guest with the same
secret, so only the control plane can command it.
"""

import os
import uuid

from kombu.exceptions import KombuError

from dbaas import settings
from workers.guestagent import commands
from workers.guestagent import config as guest_config


class GuestUnreachable(Exception):
    """A command could not be handed to the broker for the guest."""


def instances_root() -> str:
    return os.path.join(settings.get().var_dir, "instances")


def instance_dir(instance_id: str) -> str:
    # The id becomes a path that destroy removes whole: only a canonical UUID may, never "../x".
    if not isinstance(instance_id, str) or str(uuid.UUID(instance_id)) != instance_id:
        raise ValueError(f"not an instance id: {instance_id!r}")
    return os.path.join(instances_root(), instance_id)


def config_path(instance_id: str) -> str:
    return os.path.join(instance_dir(instance_id), "guest.json")


def backup_root() -> str:
    return os.path.join(settings.get().var_dir, "backups")


def send(instance_id: str, command: str, args: dict) -> None:
    try:
        secret = guest_config.load(config_path(instance_id)).secret
        commands.send_command(settings.get().broker_url, instance_id, secret, command, args)
    except (OSError, ValueError, KeyError, TypeError, KombuError) as exc:
        raise GuestUnreachable(f"cannot send {command} to the guest of {instance_id}: {exc}") from exc
