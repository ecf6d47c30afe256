"""A SQLite database file: nothing to start, a client opens ``data_dir/db.sqlite3``."""

import sqlite3
from contextlib import closing
from pathlib import Path

from dbaas.storage import copy_atomically
from workers.guestagent.api import DATASTORES
from workers.guestagent.datastores.base import Datastore

# A probe or backup waits at most this long for a writer's lock.
BUSY_TIMEOUT = 5.0


def connect(path: Path, mode: str) -> sqlite3.Connection:
    """Open an existing database file (sqlite3 would create a missing one, and a probe
    must not)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True, timeout=BUSY_TIMEOUT)


class SqliteDatastore(Datastore):
    backup_type = "sqlite-online"

    @property
    def path(self) -> Path:
        return self.data_dir / DATASTORES["sqlite"].file

    def discard(self) -> None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)

    def create(self) -> None:
        with closing(sqlite3.connect(self.path)) as database:
            # Writes the header, so that the file is a database before any client writes.
            database.execute("vacuum")

    def restore(self, src_path: str) -> None:
        with closing(connect(Path(src_path), "ro")) as backup:
            verdict = backup.execute("pragma quick_check").fetchone()[0]
        if verdict != "ok":
            raise ValueError(f"backup file is damaged: {verdict}")
        copy_atomically(src_path, self.path)

    def start(self) -> None:
        """A file serves itself."""

    def stop(self) -> None:
        """A file serves itself."""

    def probe(self) -> bool:
        try:
            # Reading the schema proves the file is a database; "select 1" alone reads nothing.
            with closing(connect(self.path, "rw")) as database:
                database.execute("select count(*) from sqlite_master").fetchone()
            return True
        except sqlite3.Error:
            return False

    def backup(self, dest_path: str) -> None:
        """The online backup API: consistent even while clients write."""
        with closing(connect(self.path, "ro")) as source, closing(sqlite3.connect(dest_path)) as dest:
            source.backup(dest)

    def connection_info(self) -> dict:
        return DATASTORES["sqlite"].connection(str(self.data_dir), None, None)
