"""Instances: ``/v1.0/{project_id}/instances`` and the admin's ``/mgmt/instances``."""

import uuid

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from dbaas.errors import InvalidRequest
from workers.api import views
from workers.api.auth import caller, listing_scope
from workers.api.catalog import find_flavor, resolve_datastore
from workers.api.conductor import conductor
from workers.api.credentials import Caller
from workers.api.errors import FAULTS

router = APIRouter(prefix="/v1.0/{project_id}", tags=["instances"], responses=FAULTS)
ACTIONS = ("restart", "reset_status")


# --- bodies: unknown and null fields are ignored (the CLI always sends some) ---------------

class Volume(BaseModel):
    size: int | None = Field(None, ge=1, description="GB")
    type: str | None = None


class DatastoreRef(BaseModel):
    type: str | None = Field(None, description="name or id; sqlite by default")
    version: str | None = Field(None, description="name or id; the datastore's default by default")


class RestorePoint(BaseModel):
    backupRef: str = Field(description="a COMPLETED backup's id")


class InstanceSpec(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    flavorRef: int | str = Field(description="a flavor's id (or str_id), or a link to it")
    volume: Volume | None = None
    datastore: DatastoreRef | None = None
    restorePoint: RestorePoint | None = None
    # Trove's, not offered here: refused when given rather than silently dropped.
    databases: list | None = Field(None, description="not offered: refused unless empty")
    users: list | None = Field(None, description="not offered: refused unless empty")
    replica_of: str | None = Field(None, description="not offered: refused")
    configuration: str | None = Field(None, description="not offered: refused")
    modules: list | None = Field(None, description="not offered: refused unless empty")


class InstanceCreate(BaseModel):
    instance: InstanceSpec


class InstanceAction(BaseModel):
    """Exactly one action."""
    model_config = ConfigDict(extra="allow")
    restart: dict | None = None
    reset_status: dict | None = None


class RootEnable(BaseModel):
    password: str | None = Field(None, description="not offered: passwords are generated; refused")


# --- routes ----------------------------------------------------------------------------------

def _listing(request: Request, who: Caller, project_id: str | None, limit: int | None,
             marker: str | None) -> JSONResponse:
    size = views.page_size(limit)
    records = conductor().instance_list(project_id, limit=size + 1, marker=marker)
    return views.page(request, "instances", records, size,
                      lambda record: views.instance(request, record, who.admin))


@router.get("/instances", summary="List instances (?all_projects=true: every project's, admins)")
def list_instances(request: Request, project_id: str, limit: int | None = Query(None, ge=1),
                   marker: str | None = Query(None, min_length=1), include_clustered: bool | None = None,
                   all_projects: bool | None = None, who: Caller = Depends(caller)):
    return _listing(request, who, listing_scope(who, project_id, all_projects), limit, marker)


@router.get("/instances/detail", summary="List instances with details (the same as the list)")
def list_instances_detail(request: Request, project_id: str, limit: int | None = Query(None, ge=1),
                          marker: str | None = Query(None, min_length=1),
                          include_clustered: bool | None = None, all_projects: bool | None = None,
                          who: Caller = Depends(caller)):
    return _listing(request, who, listing_scope(who, project_id, all_projects), limit, marker)


@router.post("/instances", status_code=200, summary="Create an instance (BUILD)")
def create_instance(request: Request, project_id: str, body: InstanceCreate,
                    who: Caller = Depends(caller)):
    spec = body.instance
    refused = [name for name in ("databases", "users", "replica_of", "configuration", "modules")
               if getattr(spec, name)]
    if refused:
        raise InvalidRequest(f"not offered by this service: {', '.join(refused)}")
    flavor = find_flavor(spec.flavorRef)
    if flavor is None:
        raise InvalidRequest(f"no flavor {str(spec.flavorRef)[:64]!r}; see GET …/flavors")
    if spec.volume is None or spec.volume.size is None:
        raise InvalidRequest("volume size is required: volume: {size: GB}")
    datastore, version = resolve_datastore(spec.datastore.type, spec.datastore.version) \
        if spec.datastore else (None, None)
    restore_from = spec.restorePoint.backupRef if spec.restorePoint else None
    record = conductor().instance_create(
        str(uuid.uuid4()), spec.name, datastore=datastore, restore_from=restore_from,
        project_id=project_id, datastore_version=version, flavor_id=flavor.str_id,
        volume_size=spec.volume.size)
    return JSONResponse({"instance": views.instance(request, record, who.admin)})


@router.get("/instances/{instance_id}", summary="Show an instance")
def show_instance(request: Request, project_id: str, instance_id: str, who: Caller = Depends(caller)):
    record = conductor().instance_show(views.known_id(instance_id, "instance"), project_id=project_id)
    return JSONResponse({"instance": views.instance(request, record, who.admin)})


@router.delete("/instances/{instance_id}", status_code=202, response_class=Response,
                summary="Delete an instance")
def delete_instance(project_id: str, instance_id: str, who: Caller = Depends(caller)):
    conductor().instance_delete(views.known_id(instance_id, "instance"), project_id=project_id)
    return Response(status_code=202)


@router.post("/instances/{instance_id}/action", status_code=202, response_class=Response,
             summary='Act on an instance: {"restart": {}} or {"reset_status": {}}')
def instance_action(project_id: str, instance_id: str, body: InstanceAction,
                    who: Caller = Depends(caller)):
    asked = [name for name in ACTIONS if getattr(body, name) is not None] + list(body.model_extra or {})
    if len(asked) != 1 or asked[0] not in ACTIONS:
        got = ", ".join(asked)[:200] or "none"
        raise InvalidRequest(f"give exactly one action of {', '.join(ACTIONS)}; got {got}")
    instance_id = views.known_id(instance_id, "instance")
    if asked[0] == "restart":
        conductor().instance_restart(instance_id, project_id=project_id)
    else:
        conductor().instance_reset_status(instance_id, project_id=project_id)
    return Response(status_code=202)


@router.get("/instances/{instance_id}/backups", summary="List an instance's backups")
def list_instance_backups(request: Request, project_id: str, instance_id: str,
                          limit: int | None = Query(None, ge=1),
                          marker: str | None = Query(None, min_length=1),
                          who: Caller = Depends(caller)):
    size = views.page_size(limit)
    records = conductor().backup_list(project_id, views.known_id(instance_id, "instance"),
                                      limit=size + 1, marker=marker)
    return views.page(request, "backups", records, size, lambda record: views.backup(request, record))


@router.post("/instances/{instance_id}/root", summary="A new password for the administrator user "
             "(Trove's root-enable: `openstack database root enable`)")
def enable_root(project_id: str, instance_id: str, body: RootEnable | None = None,
                who: Caller = Depends(caller)):
    if body and body.password:
        raise InvalidRequest("passwords are generated by this service: enable root without one")
    answer = conductor().instance_reset_password(views.known_id(instance_id, "instance"),
                                                 project_id=project_id)
    return JSONResponse({"user": {"name": answer["user"], "password": answer["password"]}})


@router.get("/instances/{instance_id}/root", summary="Whether the instance has an administrator user")
def root_enabled(project_id: str, instance_id: str, who: Caller = Depends(caller)):
    record = conductor().instance_show(views.known_id(instance_id, "instance"), project_id=project_id)
    return JSONResponse({"rootEnabled": bool((record["connection"] or {}).get("user"))})


# --- the admin's view of every project (openstack database instance list --all-projects) ---

@router.get("/mgmt/instances", summary="List every project's instances (admins)")
def mgmt_list_instances(request: Request, project_id: str, limit: int | None = Query(None, ge=1),
                        marker: str | None = Query(None, min_length=1), deleted: bool | None = None,
                        of_project: str | None = Query(None, alias="project_id"),
                        include_clustered: bool | None = None, who: Caller = Depends(caller)):
    listing_scope(who, project_id, all_projects=True)  # admins only
    if deleted:
        raise InvalidRequest("deleted instances are not listed")
    return _listing(request, who, of_project, limit, marker)


@router.get("/mgmt/instances/{instance_id}", summary="Show any project's instance (admins)")
def mgmt_show_instance(request: Request, project_id: str, instance_id: str,
                       who: Caller = Depends(caller)):
    listing_scope(who, project_id, all_projects=True)
    record = conductor().instance_show(views.known_id(instance_id, "instance"))
    return JSONResponse({"instance": views.instance(request, record, admin=True)})
