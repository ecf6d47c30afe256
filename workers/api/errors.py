"""Every error the API answers is Trove's fault body, ``{"itemNotFound": {"code": 404,
"message": "…"}}``, as application/json — never a framework's default body:
python-troveclient reads the first value of the body as a mapping (a ``{"detail": [...]}``
crashes it), and osc-lib falls back to finding by name only on a 404."""

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from dbaas import errors

log = logging.getLogger(__name__)

# Trove's fault names (trove/common/wsgi.py); other codes follow webob's class names.
FAULT_NAMES = {
    400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound",
    405: "badMethod", 409: "conflict", 413: "overLimit", 415: "badMediaType",
    422: "unprocessableEntity", 500: "instanceFault", 501: "notImplemented",
    503: "serviceUnavailable",
}
DEFAULT_MESSAGES = {
    404: "The resource could not be found.", 405: "The method is not allowed for this resource.",
}
# What the conductor's answers become. Conflict is Trove's 422: the object is not in a state
# that allows the request ("only an ACTIVE instance can be backed up").
STATUS_OF = [
    (errors.NotFound, 404), (errors.OverLimit, 413), (errors.Conflict, 422),
    (errors.InvalidRequest, 400), (errors.Unavailable, 503), (errors.DbaasError, 500),
]


class FaultDetail(BaseModel):
    code: int
    message: str


def fault(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    name = FAULT_NAMES.get(status, "computeFault" if status >= 500 else "badRequest")
    return JSONResponse({name: {"code": status, "message": message}}, status_code=status,
                        headers=headers)


def fault_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` entries for these fault statuses."""
    return {status: {"description": FAULT_NAMES[status],
                     "content": {"application/json": {"schema": {
                         "type": "object", "minProperties": 1, "maxProperties": 1,
                         "additionalProperties": FaultDetail.model_json_schema()}}}}
            for status in statuses}


# Every operation of /v1.0/{project_id}/ may answer these.
FAULTS = fault_responses(400, 401, 403, 404, 413, 422, 500, 503)


def status_of(exc: errors.DbaasError) -> int:
    return next(status for cls, status in STATUS_OF if isinstance(exc, cls))


def validation_message(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(problems)


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        # The framework's own (an unknown path, a wrong method) carry only the status phrase.
        message = str(exc.detail)
        if message == HTTPStatus(exc.status_code).phrase:
            message = DEFAULT_MESSAGES.get(exc.status_code, message)
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return fault(exc.status_code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        return fault(400, validation_message(exc))

    @app.exception_handler(errors.DbaasError)
    async def conductor_error(_request: Request, exc: errors.DbaasError):
        status = status_of(exc)
        if status >= 500:
            log.error("answering %d: %s", status, exc)
        return fault(status, str(exc) or FAULT_NAMES[status])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return fault(500, "The server could not carry out the request; see the API's log.")



def allowed_methods(request: Request) -> list[str]:
    """The methods of the path, from the OpenAPI document: the first path template that
    matches, in route order, is the one routing chose (Starlette's own 405 names the methods
    of one route only, and a path has a route per method)."""
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), request.url.path):
            return sorted(method.upper() for method in operations)
    return []
