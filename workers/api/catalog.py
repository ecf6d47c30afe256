"""What the service offers, from its configuration alone (no conductor call): datastores
and their versions (those guests can run, workers/guestagent/api.py) and flavors
(``DBAAS_API_FLAVORS``).

Datastores and versions are known by name; Trove also gives them UUIDs, which clients
pass back (``openstack datastore version show <uuid>``), so each has a fixed one derived
from its name.
"""

import re
import uuid
from dataclasses import dataclass
from functools import cache

from dbaas import settings
from dbaas.settings import SettingError
from workers.guestagent.api import DATASTORES

_NAMESPACE = uuid.UUID("9a4c6a5e-3f0e-4d8e-9a57-2d6a1f0c7b31")
FLAVOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,35}")


def datastore_id(name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"datastore\0{name}"))


def version_id(datastore: str, version: str | None) -> str | None:
    return str(uuid.uuid5(_NAMESPACE, f"datastore-version\0{datastore}\0{version}")) if version else None


def find_datastore(ref: str) -> str | None:
    """The name of the datastore ``ref`` names or identifies."""
    return next((name for name in DATASTORES if ref in (name, datastore_id(name))), None)


def find_version(datastore: str, ref: str) -> str | None:
    return next((v for v in DATASTORES[datastore].versions if ref in (v, version_id(datastore, v))), None)


def find_version_anywhere(ref: str) -> tuple[str, str] | None:
    return next(((name, v) for name, info in DATASTORES.items() for v in info.versions
                 if ref == version_id(name, v)), None)


def resolve_datastore(datastore: str | None, version: str | None) -> tuple[str | None, str | None]:
    """Names for what a request names by name or id. What is unknown passes as it is: the
    conductor, which holds the rules, refuses it."""
    if datastore is None and version is not None:
        return find_version_anywhere(version) or (None, version)
    datastore = datastore and (find_datastore(datastore) or datastore)
    if datastore in DATASTORES and version is not None:
        version = find_version(datastore, version) or version
    return datastore, version


@dataclass(frozen=True)
class Flavor:
    str_id: str
    name: str
    ram: int
    vcpus: int
    disk: int

    @property
    def id(self) -> int | None:
        """Trove's numeric id: only for a decimal id without leading zeros (else ``str_id``)."""
        return int(self.str_id) if re.fullmatch(r"0|[1-9][0-9]*", self.str_id) else None


def parse_flavors(text: str) -> tuple[Flavor, ...]:
    flavors = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        try:
            str_id, name, ram, vcpus, disk = fields
            flavor = Flavor(str_id, name, int(ram), int(vcpus), int(disk))
        except ValueError:
            raise SettingError(f"DBAAS_API_FLAVORS: {item!r} is not ID:NAME:RAM_MB:VCPUS:DISK_GB") from None
        if not (FLAVOR_ID.fullmatch(str_id) and name.isprintable()
                and min(flavor.ram, flavor.vcpus, flavor.disk) >= 0):
            raise SettingError(f"DBAAS_API_FLAVORS: bad flavor {item!r}")
        flavors.append(flavor)
    if not flavors or len({f.str_id for f in flavors}) != len(flavors):
        raise SettingError("DBAAS_API_FLAVORS: at least one flavor, each id once")
    return tuple(flavors)


@cache
def _flavors(text: str) -> tuple[Flavor, ...]:
    return parse_flavors(text)


def flavors() -> tuple[Flavor, ...]:
    return _flavors(settings.get().api_flavors)


def find_flavor(ref) -> Flavor | None:
    """By id as Trove's ``flavorRef`` gives it: a number, a string, or a link ending in one."""
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        return None
    wanted = str(ref).rstrip("/").rsplit("/", 1)[-1]
    return next((f for f in flavors() if f.str_id == wanted), None)
