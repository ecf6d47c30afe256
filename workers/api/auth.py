"""Authentication before anything else: every path under ``/v1.0/{project_id}/`` needs
credentials (credentials.py), checked before routing and before the body is read, so an
anonymous request learns nothing — not even whether a path exists — and costs no more
than a header check.

- no or bad credentials: 401;
- a project id that cannot be one (``credentials.PROJECT_ID``): 404, as a missing object;
- another project's URL: 403, unless the caller is an admin, who may act for any project.

Objects of another project are then told apart by the conductor, which answers exactly
the 404 of a missing one.
"""

import base64
import binascii

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from dbaas.errors import not_found
from workers.api.credentials import PROJECT_ID, Caller, Store
from workers.api.errors import fault

API_PREFIX = "v1.0"
CHALLENGE = {"WWW-Authenticate": 'Basic realm="dbaas"'}


class Authenticate:
    """ASGI middleware; puts the ``Caller`` into the request's state."""

    def __init__(self, app, store: Store):
        self.app = app
        self.store = store

    async def __call__(self, scope, receive, send):
        parts = scope["path"].split("/", 3) if scope["type"] == "http" else []
        if len(parts) < 3 or parts[1] != API_PREFIX or not parts[2]:
            return await self.app(scope, receive, send)  # versions, the OpenAPI document
        caller = await self.authenticate(scope)
        project_id = parts[2]
        if caller is None:
            response = fault(401, "Authentication required: HTTP basic or X-Auth-Token.", CHALLENGE)
        elif not PROJECT_ID.fullmatch(project_id):
            response = fault(404, str(not_found("project", project_id)))
        elif project_id != caller.project and not caller.admin:
            response = fault(403, f"{caller.name} may not act for project {project_id}.")
        else:
            scope.setdefault("state", {})["caller"] = caller
            return await self.app(scope, receive, send)
        await response(scope, receive, send)

    async def authenticate(self, scope) -> Caller | None:
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"")
        if authorization[:6].lower() == b"basic ":
            try:
                decoded = base64.b64decode(authorization[6:], validate=True).decode()
                name, colon, password = decoded.partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            if not colon:
                return None
            # A password not seen before costs one scrypt: not on the event loop.
            return await run_in_threadpool(self.store.by_password, name, password)
        token = headers.get(b"x-auth-token")
        if token:
            try:
                return self.store.by_token(token.decode())
            except UnicodeDecodeError:
                return None
        return None


def caller(request: Request) -> Caller:
    """The authenticated caller (a route dependency)."""
    return request.state.caller


def listing_scope(who: Caller, project_id: str, all_projects: bool | None) -> str | None:
    """The project a list covers: the URL's, or every one (None) for an admin who asks."""
    if all_projects:
        if not who.admin:
            raise HTTPException(403, "Only an admin may list all projects.")
        return None
    return project_id
