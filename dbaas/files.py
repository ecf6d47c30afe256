"""Replacing a file whole: a reader, or a crash, sees the old content or the new, never half.

Standard library only: guests and the embedded broker import it.
"""

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replaced(path: str | os.PathLike, mode: int = 0o644, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside *path* to write; renamed onto *path* when the block ends
    without error, removed otherwise. Its name starts with a dot and ends in ``.tmp`` so
    that directory scanners (the embedded broker's queues) never take it for a real file.
    ``fsync`` makes the content durable before the rename (backups)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # Created with its final mode: a secret is never readable by others, even briefly.
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        yield temporary
        if fsync:
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, data: str | bytes, mode: int = 0o644,
                     fsync: bool = False) -> None:
    with replaced(path, mode, fsync) as temporary:
        with open(temporary, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
