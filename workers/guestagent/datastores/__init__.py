"""The datastores a guest can run, by the name in its config (``datastore``)."""

from workers.guestagent.datastores.base import Datastore
from workers.guestagent.datastores.postgresql import PostgresqlDatastore
from workers.guestagent.datastores.sqlite import SqliteDatastore

DATASTORES: dict[str, type[Datastore]] = {
    "sqlite": SqliteDatastore,
    "postgresql": PostgresqlDatastore,
}


def datastore_for(name: str, data_dir: str) -> Datastore:
    if name not in DATASTORES:
        raise ValueError(f"unknown datastore {name!r}; known: {', '.join(DATASTORES)}")
    return DATASTORES[name](data_dir)
