"""Backups: ``/v1.0/{project_id}/backups``."""

import uuid

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from dbaas.errors import InvalidRequest
from workers.api import views
from workers.api.auth import caller, listing_scope
from workers.api.conductor import conductor
from workers.api.credentials import Caller
from workers.api.errors import FAULTS

router = APIRouter(prefix="/v1.0/{project_id}", tags=["backups"], responses=FAULTS)


class BackupSpec(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    instance: str = Field(description="the id of the ACTIVE instance to back up")
    description: str | None = Field(None, max_length=2000)
    # Trove's, not offered here: refused when given (the CLI always sends incremental: 0).
    incremental: int | None = Field(None, description="not offered: refused unless 0")
    parent_id: str | None = Field(None, description="not offered: refused")
    restore_from: dict | None = Field(None, description="not offered: refused")


class BackupCreate(BaseModel):
    backup: BackupSpec


@router.get("/backups", summary="List backups (?all_projects=true: every project's, admins)")
def list_backups(request: Request, project_id: str, limit: int | None = Query(None, ge=1),
                 marker: str | None = Query(None, min_length=1), instance_id: str | None = None,
                 datastore: str | None = None, all_projects: bool | None = None,
                 of_project: str | None = Query(None, alias="project_id",
                                                description="with all_projects: only this one"),
                 who: Caller = Depends(caller)):
    scope = listing_scope(who, project_id, all_projects)
    if scope is None and of_project:
        scope = of_project
    size = views.page_size(limit)
    records = conductor().backup_list(scope, instance_id and views.known_id(instance_id, "instance"),
                                      datastore=datastore, limit=size + 1, marker=marker)
    return views.page(request, "backups", records, size, lambda record: views.backup(request, record))


@router.post("/backups", status_code=202, summary="Create a backup of an ACTIVE instance (NEW)")
def create_backup(request: Request, project_id: str, body: BackupCreate, who: Caller = Depends(caller)):
    spec = body.backup
    if spec.incremental or spec.parent_id:
        raise InvalidRequest("incremental backups are not offered by this service")
    if spec.restore_from is not None:
        raise InvalidRequest("importing a backup is not offered by this service")
    record = conductor().backup_create(str(uuid.uuid4()), views.known_id(spec.instance, "instance"),
                                       spec.name, description=spec.description,
                                       project_id=project_id)
    return JSONResponse({"backup": views.backup(request, record)}, status_code=202)


@router.get("/backups/{backup_id}", summary="Show a backup")
def show_backup(request: Request, project_id: str, backup_id: str, who: Caller = Depends(caller)):
    record = conductor().backup_show(views.known_id(backup_id, "backup"), project_id=project_id)
    return JSONResponse({"backup": views.backup(request, record)})


@router.delete("/backups/{backup_id}", status_code=202, response_class=Response,
                summary="Delete a COMPLETED or FAILED backup")
def delete_backup(project_id: str, backup_id: str, who: Caller = Depends(caller)):
    conductor().backup_delete(views.known_id(backup_id, "backup"), project_id=project_id)
    return Response(status_code=202)
