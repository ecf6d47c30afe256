"""Flavors: ``/v1.0/{project_id}/flavors``, the configured list (``DBAAS_API_FLAVORS``).

Each has both ``id`` and ``str_id``: troveclient takes ``str_id`` when ``id`` is null, and
Trove's ``id`` is a number only for a decimal id."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from dbaas.errors import not_found
from workers.api import views
from workers.api.auth import caller
from workers.api.catalog import Flavor, find_flavor, flavors
from workers.api.errors import FAULTS

router = APIRouter(prefix="/v1.0/{project_id}", tags=["flavors"], dependencies=[Depends(caller)],
                   responses=FAULTS)


def flavor_view(request: Request, project_id: str, flavor: Flavor) -> dict:
    return {"id": flavor.id, "str_id": flavor.str_id, "name": flavor.name, "ram": flavor.ram,
            "vcpus": flavor.vcpus, "disk": flavor.disk, "ephemeral": 0,
            "links": views.links(request, project_id, "flavors", flavor.str_id)}


@router.get("/flavors", summary="List flavors")
def list_flavors(request: Request, project_id: str):
    return JSONResponse({"flavors": [flavor_view(request, project_id, flavor) for flavor in flavors()]})


@router.get("/flavors/{flavor_id}", summary="Show a flavor")
def show_flavor(request: Request, project_id: str, flavor_id: str):
    flavor = find_flavor(flavor_id)
    if flavor is None:
        raise not_found("flavor", flavor_id)
    return JSONResponse({"flavor": flavor_view(request, project_id, flavor)})
