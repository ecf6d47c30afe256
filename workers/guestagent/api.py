"""The guest agent's public face to the control plane: the only module of this package that
control-plane code imports. It holds what the taskmanager needs to run a guest — the
config file format, the command wire format, the datastores a guest can run and what
each needs — and nothing of the agent's internals.

Depends on the standard library, kombu and dbaas's small shared modules only.
"""

from dataclasses import dataclass

from workers.guestagent.commands import COMMANDS, command_queue, send_command
from workers.guestagent.config import GuestConfig, write as write_config


@dataclass(frozen=True)
class DatastoreInfo:
    versions: tuple[str, ...]
    # Whether it listens on a TCP port the compute driver must choose (SQLite is a file).
    needs_port: bool


DATASTORES: dict[str, DatastoreInfo] = {
    "sqlite": DatastoreInfo(versions=("3",), needs_port=False),
    "postgresql": DatastoreInfo(versions=("15",), needs_port=True),
}

__all__ = ["COMMANDS", "DATASTORES", "DatastoreInfo", "GuestConfig", "command_queue",
           "send_command", "write_config"]
