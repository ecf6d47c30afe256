"""The guest's configuration file: where the broker is, which instance it is, its secret."""

import json
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GuestConfig:
    instance_id: str
    secret: str
    broker_url: str
    conductor_queue: str = "trove-conductor"
    datastore: str = "sqlite"
    # Where the datastore keeps its files and where backups are stored (local storage).
    data_dir: str = ""
    backup_root: str = ""
    heartbeat_interval: float = 10.0


def write(path: str, config: GuestConfig) -> None:
    """Written owner-only: the file holds the instance's secret."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(config), out, indent=2)
    os.replace(temporary, path)


def load(path: str) -> GuestConfig:
    with open(path) as source:
        raw = json.load(source)
    return GuestConfig(**{key: raw[key] for key in GuestConfig.__dataclass_fields__ if key in raw})
