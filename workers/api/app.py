"""The REST API's application: Trove v1.0 on FastAPI, its OpenAPI document at
``/openapi.json`` (browsable at ``/docs``)."""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from dbaas import settings
from workers.api import backups, datastores, errors, flavors, instances, limits, versions
from workers.api.auth import API_PREFIX, Authenticate
from workers.api.body_limit import LimitBody
from workers.api.catalog import flavors as configured_flavors
from workers.api.credentials import Store

DESCRIPTION = """Trove's v1.0 API for a project's database instances and backups:
python-troveclient and `openstack database …` work against it unmodified.

Authenticate with HTTP basic or `X-Auth-Token` (see the README); every path under
`/v1.0/{project_id}/` needs it. Errors are Trove's fault bodies,
`{"itemNotFound": {"code": 404, "message": "…"}}`."""


def create_app(config: settings.Settings | None = None) -> FastAPI:
    config = config or settings.get()
    configured_flavors()  # a bad DBAAS_API_FLAVORS stops the start, not the first request
    app = FastAPI(title="dbaas", version="1.0", description=DESCRIPTION, redoc_url=None)
    errors.install(app)
    for module in (versions, instances, backups, datastores, flavors, limits):
        app.include_router(module.router)
    # Outermost last: credentials before anything else, then the body's size.
    app.add_middleware(LimitBody, limit=config.api_max_body_bytes)
    app.add_middleware(Authenticate,
                       store=Store(config.api_credentials_file, config.api_credentials))
    app.openapi = lambda: openapi_document(app)
    return app


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document, saying how to authenticate: basic or token on every operation
    under a project."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
        document.setdefault("components", {})["securitySchemes"] = {
            "basic": {"type": "http", "scheme": "basic"},
            "token": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"},
        }
        for path, operations in document["paths"].items():
            if path.startswith(f"/{API_PREFIX}/{{project_id}}"):
                for operation in operations.values():
                    operation["security"] = [{"basic": []}, {"token": []}]
        app.openapi_schema = document
    return app.openapi_schema
