"""Where backups are kept: put a file under a backup id, get it back by its location.

Guests import this module, so it depends on nothing but the standard library.
"""

import os
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dbaas.files import replaced

# A backup id becomes a file name: no separators, no leading dot (temp files have one).
BACKUP_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class StorageError(Exception):
    """The location is not one this storage holds, or the object is missing."""


class Storage(ABC):
    @abstractmethod
    def put(self, backup_id: str, src_path: str) -> str:
        """Store a copy of the file at *src_path*; return its location."""

    @abstractmethod
    def get(self, location: str, dest_path: str) -> None:
        """Write the object at *location* to *dest_path* (complete or not at all)."""

    @abstractmethod
    def delete(self, location: str) -> None:
        """Remove the object; nothing if it is already gone."""

    @abstractmethod
    def exists(self, location: str) -> bool:
        ...


def copy_atomically(src: str | os.PathLike, dest: Path) -> None:
    """A durable copy that appears under its final name whole or not at all."""
    with replaced(dest, fsync=True) as temporary:
        shutil.copyfile(src, temporary)


class LocalStorage(Storage):
    """Backups as files directly under *root*, located by ``file://`` URLs."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.realpath(root))

    def put(self, backup_id: str, src_path: str) -> str:
        if not BACKUP_NAME.fullmatch(backup_id):
            raise StorageError(f"backup id {backup_id!r} is not a plain name")
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / backup_id
        copy_atomically(src_path, dest)
        return dest.as_uri()

    def get(self, location: str, dest_path: str) -> None:
        path = self.path(location)
        if not path.is_file():
            raise StorageError(f"no backup at {location}")
        copy_atomically(path, Path(dest_path))

    def delete(self, location: str) -> None:
        self.path(location).unlink(missing_ok=True)

    def exists(self, location: str) -> bool:
        return self.path(location).is_file()

    def path(self, location: str) -> Path:
        """The file of *location*, which must name a backup directly under root: a
        location arrives in a message, and must not reach any other file."""
        parts = urlsplit(location)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise StorageError(f"not a local storage location: {location!r}")
        path = Path(unquote(parts.path))
        if path.parent != self.root or not BACKUP_NAME.fullmatch(path.name):
            raise StorageError(f"location {location!r} is outside the backup root {self.root}")
        return path
