"""What the agent needs from a datastore, and the prepare sequence they all share."""

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

from dbaas.files import write_atomically

STATE_FILE = "datastore.json"


def write_json(path: Path, data: dict) -> None:
    """Replace *path* whole: a crash leaves the old content or the new, never half."""
    write_atomically(path, json.dumps(data))


class Datastore(ABC):
    """One database living in ``data_dir``.

    ``data_dir/datastore.json`` records the settings chosen at prepare (e.g. a port) and,
    written last, ``"prepared": true``: a datastore whose prepare was interrupted is
    not prepared, and the next prepare discards what it left and starts over.
    """

    #: reported as the backup's backup_type
    backup_type: str
    #: the administrator user clients log in as; None for a datastore without users
    admin_user: str | None = None

    def __init__(self, data_dir: str | os.PathLike):
        # Absolute: programs a datastore runs may work in another directory.
        self.data_dir = Path(data_dir).absolute()

    def state(self) -> dict:
        try:
            return json.loads((self.data_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return {}

    def prepared(self) -> bool:
        return self.state().get("prepared", False)

    def prepare(self, restore_from: str | None = None, port: int | None = None,
                host: str | None = None, admin_password: str | None = None) -> bool:
        """Create the database, or fill it from the backup file *restore_from*, and start
        it, its administrator's password set (a datastore with users). Idempotent: an
        already prepared datastore is only started. Returns whether it was created now."""
        if self.prepared():
            self.start()
            return False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.discard()
        settings = self.settings(port, host)
        write_json(self.data_dir / STATE_FILE, {"prepared": False, **settings})
        if restore_from:
            self.restore(restore_from)
        else:
            self.create()
        self.start()
        if self.admin_user and admin_password is not None:
            self.set_admin_password(admin_password)
        write_json(self.data_dir / STATE_FILE, {"prepared": True, **settings})
        return True

    def settings(self, port: int | None, host: str | None) -> dict:
        """What prepare must remember in the state file; *port* is the one asked for and
        *host* an address to listen on besides loopback (where clients reach it)."""
        return {}

    @abstractmethod
    def discard(self) -> None:
        """Remove whatever an interrupted prepare left (nothing is running from it after)."""

    @abstractmethod
    def create(self) -> None:
        """An empty database, not necessarily running."""

    @abstractmethod
    def restore(self, src_path: str) -> None:
        """A database holding the contents of the backup file *src_path*, in place of a
        discarded one."""

    @abstractmethod
    def start(self) -> None:
        """Start serving; nothing if already serving (adopting a server left running)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop serving cleanly; nothing if not serving."""

    @abstractmethod
    def probe(self) -> bool:
        """Whether the database answers a query now (bounded in time)."""

    @abstractmethod
    def backup(self, dest_path: str) -> None:
        """A consistent copy of the running database written to *dest_path*."""

    def set_admin_password(self, password: str) -> None:
        """Give the administrator user (made if missing) this password; it must be serving."""
        raise NotImplementedError(f"{type(self).__name__} has no users")

    @abstractmethod
    def connection_info(self) -> dict:
        """How a client reaches the database."""
