"""The embedded broker: a kombu transport over one directory, no server process.

Importing this package registers the ``dbaasfs`` URL scheme with kombu, so
``Celery(broker='dbaasfs:///abs/path')`` and ``kombu.Connection(...)`` find the
transport. Kept free of Celery-app and database imports: guest agents import it.
"""

import os
from urllib.parse import quote

from kombu.transport import TRANSPORT_ALIASES

SCHEME = "dbaasfs"

TRANSPORT_ALIASES[SCHEME] = "dbaas.broker.fs_transport:Transport"


def broker_url_for(path: str | os.PathLike) -> str:
    """The broker URL of directory *path*; relative paths are resolved against the cwd now,
    because the processes sharing the broker may run from different directories."""
    return f"{SCHEME}://{quote(os.path.abspath(path))}"
