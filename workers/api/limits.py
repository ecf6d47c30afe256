"""Limits: ``/v1.0/{project_id}/limits`` — the project's quotas, as Trove's absolute limits
(the conductor counts what is in use). There are no rate limits."""

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from workers.api.auth import caller
from workers.api.conductor import conductor
from workers.api.errors import FAULTS

router = APIRouter(prefix="/v1.0/{project_id}", tags=["limits"], dependencies=[Depends(caller)],
                   responses=FAULTS)


@router.get("/limits", summary="The project's quotas and what is in use")
def limits(project_id: str):
    quota = conductor().quota_show(project_id)
    absolute = {"verb": "ABSOLUTE"}
    for resource in ("instances", "backups"):
        absolute[f"max_{resource}"] = quota[resource]["limit"]
        absolute[f"{resource}_in_use"] = quota[resource]["in_use"]
    return JSONResponse({"limits": [absolute]})
