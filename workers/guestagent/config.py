"""The guest's configuration file: where the broker is, which instance it is, its secret."""

import json
import os
from dataclasses import asdict, dataclass

from dbaas.files import write_atomically


@dataclass(frozen=True)
class GuestConfig:
    instance_id: str
    secret: str
    broker_url: str
    # The generation of the credentials the secret belongs to (dbaas.signing.guest_secret).
    generation: int = 1
    conductor_queue: str = "trove-conductor"
    datastore: str = "sqlite"
    # Where the datastore keeps its files and where backups are stored (local storage).
    data_dir: str = ""
    backup_root: str = ""
    heartbeat_interval: float = 10.0


def write(path: str, config: GuestConfig) -> None:
    """Written owner-only: the file holds the instance's secret."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, json.dumps(asdict(config), indent=2), mode=0o600)


def load(path: str) -> GuestConfig:
    with open(path) as source:
        raw = json.load(source)
    return GuestConfig(**{key: raw[key] for key in GuestConfig.__dataclass_fields__ if key in raw})
