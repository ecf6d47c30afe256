"""Trove's bodies, made from the conductor's records (workers/conductor/instances.py and
backups.py ``view``): what python-troveclient and the openstack CLI read.

A key the clients read must be present even when it has no value: a list item without
``flavor.id`` costs a lazy GET per item, a shown instance without ``datastore.version``
crashes ``openstack database instance show``.

Routes answer a ``JSONResponse`` of these plain dicts: a returned dict would go through
FastAPI's ``jsonable_encoder``, ten times ``json.dumps`` (19 ms against 2 ms for a list of
100 instances here).
"""

import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from dbaas import settings
from dbaas.errors import not_found
from workers.api.auth import API_PREFIX
from workers.api.catalog import version_id


def known_id(object_id: str, kind: str) -> str:
    """Ids are canonical UUIDs; anything else names nothing (404), and never reaches the
    conductor."""
    try:
        if str(uuid.UUID(object_id)) == object_id:
            return object_id
    except ValueError:
        pass
    raise not_found(kind, object_id)


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def links(request: Request, project_id: str, collection: str, object_id) -> list[dict]:
    base = base_url(request)
    return [{"href": f"{base}/{API_PREFIX}/{project_id}/{collection}/{object_id}", "rel": "self"},
            {"href": f"{base}/{collection}/{object_id}", "rel": "bookmark"}]


def instance(request: Request, record: dict, admin: bool = False) -> dict:
    project_id, flavor_id = record["project_id"], record["flavor_id"]
    body = {
        "id": record["id"],
        "name": record["name"],
        "status": record["status"],
        "operating_status": record["operating_status"],
        "links": links(request, project_id, "instances", record["id"]),
        "flavor": {"id": flavor_id,
                   "links": links(request, project_id, "flavors", flavor_id) if flavor_id else []},
        "datastore": {"type": record["datastore"], "version": record["datastore_version"]},
        "volume": {"size": record["volume_size"]},
        # Guests listen on the control plane's own network: nothing is published.
        "access": {"is_public": False},
        "created": record["created"],
        "updated": record["updated"],
    }
    if record["fault"]:
        body["fault"] = {"message": record["fault"]["message"], "created": record["fault"]["created"],
                         "details": record["fault"]["kind"]}
    # How to connect (datastores that listen on a port): the address the guest was given.
    if record["host"]:
        body["ip"] = [record["host"]]
        body["addresses"] = [{"address": record["host"], "type": "private"}]
    if record["port"]:
        body["port"] = record["port"]
    # A file's path is the control plane's business, not a tenant's: only network logins.
    if record["connection"] and record["connection"].get("host"):
        body["connection"] = record["connection"]
    # The administrator's password is in the create answer only (Trove's root_on_create).
    if record.get("password"):
        body["password"] = record["password"]
    if admin:
        body["tenant_id"] = project_id
    return body


def backup(request: Request, record: dict) -> dict:
    body = {
        "id": record["id"],
        "name": record["name"],
        "description": record["description"],
        "locationRef": record["location"],
        "instance_id": record["instance_id"],
        "created": record["created"],
        "updated": record["updated"],
        "size": record["size"],
        "status": record["state"],
        "parent_id": None,
        "project_id": record["project_id"],
    }
    if record["datastore"]:
        body["datastore"] = {"type": record["datastore"], "version": record["datastore_version"],
                             "version_id": version_id(record["datastore"], record["datastore_version"])}
    if record["fail_reason"]:
        body["fail_reason"] = record["fail_reason"]
    return body


def page_size(limit: int | None) -> int:
    """The size of the page asked for, lowered to ``DBAAS_API_PAGE_SIZE``."""
    largest = settings.get().api_page_size
    return min(limit or largest, largest)


def page(request: Request, key: str, records: list, size: int, view) -> JSONResponse:
    """``{key: [...], "links": [...]}`` from ``records`` fetched with ``limit=size + 1``: the
    one beyond the page says there is a next one, linked with the last id as marker
    (troveclient reads only the marker of the ``rel: next`` link)."""
    body = {key: [view(record) for record in records[:size]], "links": []}
    if len(records) > size:
        after = request.url.include_query_params(limit=size, marker=records[size - 1]["id"])
        body["links"].append({"href": str(after), "rel": "next"})
    return JSONResponse(body)
