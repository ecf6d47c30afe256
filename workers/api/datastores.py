"""Datastores and their versions: ``/v1.0/{project_id}/datastores`` (``openstack datastore
…``). Each is found by name or by id, as in Trove."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from dbaas.errors import not_found
from workers.api import views
from workers.api.auth import caller
from workers.api.catalog import (datastore_id, find_datastore, find_version, find_version_anywhere,
                                 flavors, version_id)
from workers.api.errors import FAULTS
from workers.api.flavors import flavor_view
from workers.guestagent.api import DATASTORES

router = APIRouter(prefix="/v1.0/{project_id}", tags=["datastores"], dependencies=[Depends(caller)],
                   responses=FAULTS)


def datastore_view(request: Request, project_id: str, name: str) -> dict:
    versions = DATASTORES[name].versions
    return {"id": datastore_id(name), "name": name,
            "links": views.links(request, project_id, "datastores", datastore_id(name)),
            "versions": [{"id": version_id(name, v), "name": v,
                          "links": views.links(request, project_id, "datastores/versions",
                                               version_id(name, v))}
                         for v in versions],
            "default_version": version_id(name, versions[0])}


def version_view(request: Request, project_id: str, name: str, version: str) -> dict:
    return {"id": version_id(name, version), "name": version, "version": version,
            "datastore": datastore_id(name), "active": True,
            "links": views.links(request, project_id, "datastores/versions", version_id(name, version))}


def known_datastore(ref: str) -> str:
    name = find_datastore(ref)
    if name is None:
        raise not_found("datastore", ref)
    return name


def known_version(datastore: str, ref: str) -> str:
    version = find_version(datastore, ref)
    if version is None:
        raise not_found("datastore version", ref)
    return version


@router.get("/datastores", summary="List datastores")
def list_datastores(request: Request, project_id: str):
    return JSONResponse({"datastores": [datastore_view(request, project_id, name) for name in DATASTORES],
                         "links": []})


@router.get("/datastores/versions/{version_id}", summary="Show a datastore version by its id")
def show_version_by_id(request: Request, project_id: str, version_id: str):
    found = find_version_anywhere(version_id)
    if found is None:
        raise not_found("datastore version", version_id)
    return JSONResponse({"version": version_view(request, project_id, *found)})


@router.get("/datastores/{datastore}", summary="Show a datastore (name or id)")
def show_datastore(request: Request, project_id: str, datastore: str):
    return JSONResponse({"datastore": datastore_view(request, project_id, known_datastore(datastore))})


@router.get("/datastores/{datastore}/versions", summary="List a datastore's versions")
def list_versions(request: Request, project_id: str, datastore: str):
    name = known_datastore(datastore)
    return JSONResponse({"versions": [version_view(request, project_id, name, v)
                                      for v in DATASTORES[name].versions], "links": []})


@router.get("/datastores/{datastore}/versions/{version}", summary="Show a datastore version")
def show_version(request: Request, project_id: str, datastore: str, version: str):
    name = known_datastore(datastore)
    return JSONResponse({"version": version_view(request, project_id, name, known_version(name, version))})


@router.get("/datastores/{datastore}/versions/{version}/flavors",
            summary="Flavors for a datastore version (all of them)")
def version_flavors(request: Request, project_id: str, datastore: str, version: str):
    known_version(known_datastore(datastore), version)
    return JSONResponse({"flavors": [flavor_view(request, project_id, flavor) for flavor in flavors()]})
