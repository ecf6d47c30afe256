"""The versions document, without credentials as in Trove (clients do not ask for it)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from workers.api import views
from workers.api.auth import API_PREFIX

router = APIRouter(tags=["versions"])


def version(request: Request) -> dict:
    return {"id": API_PREFIX, "status": "CURRENT", "updated": "2012-08-01T00:00:00Z",
            "links": [{"href": f"{views.base_url(request)}/{API_PREFIX}/", "rel": "self"}]}


@router.get("/", summary="The API's versions")
def versions(request: Request):
    return JSONResponse({"versions": [version(request)]})


@router.get(f"/{API_PREFIX}", summary="Version 1.0", include_in_schema=False)
@router.get(f"/{API_PREFIX}/", summary="Version 1.0")
def version_document(request: Request):
    return JSONResponse({"version": version(request)})
