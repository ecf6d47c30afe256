"""The guest agent's public face to the control plane: the only module of this package that
control-plane code imports. It holds what the taskmanager needs to run a guest — the
config file format, the command wire format, the datastores a guest can run and what
each needs — and nothing of the agent's internals.

Depends on the standard library, kombu and dbaas's small shared modules only.
"""

import os
from dataclasses import dataclass

from workers.guestagent.commands import COMMANDS, command_queue, send_command
from workers.guestagent.config import GuestConfig, write as write_config
from workers.guestagent.pidlock import running_agent


@dataclass(frozen=True)
class DatastoreInfo:
    versions: tuple[str, ...]
    # Whether it listens on a TCP port the compute driver must choose (SQLite is a file).
    needs_port: bool
    # The user a client logs in as (its password: dbaas.signing.admin_password) and the
    # database it opens; None for a datastore without users.
    admin_user: str | None = None
    database: str | None = None
    # The file a client opens, relative to the guest's data_dir, for a datastore that is one.
    file: str | None = None

    def connection(self, data_dir: str | None, host: str | None, port: int | None) -> dict | None:
        """What a client needs to connect: ``{host, port, user, database}``, or ``{path}``
        for a file (None when the file is out of the client's reach)."""
        if self.file:
            return {"path": os.path.join(data_dir, self.file)} if data_dir else None
        return {"host": host, "port": port, "user": self.admin_user, "database": self.database}


DATASTORES: dict[str, DatastoreInfo] = {
    "sqlite": DatastoreInfo(versions=("3",), needs_port=False, file="db.sqlite3"),
    "postgresql": DatastoreInfo(versions=("15",), needs_port=True, admin_user="admin",
                                database="postgres"),
}

__all__ = ["COMMANDS", "DATASTORES", "DatastoreInfo", "GuestConfig", "command_queue",
           "running_agent", "send_command", "write_config"]
