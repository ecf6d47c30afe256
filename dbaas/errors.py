"""Errors a conductor call can answer with, shared by the conductor and its clients.

They cross the broker as data (``{"error": {"kind": …, "message": …}}``), never as
pickled exceptions, and each client shows them its own way: the CLI as one line, the
REST API as Trove's error bodies. Standard library only.
"""


class DbaasError(Exception):
    kind = "error"


class InvalidRequest(DbaasError):
    """The request cannot be carried out as asked (a bad name, an unknown datastore…)."""
    kind = "invalid"


class NotFound(InvalidRequest):
    """No such object — or not one the caller may see, which must read the same."""
    kind = "not_found"


class Conflict(InvalidRequest):
    """The object is not in a state that allows this (a backup of a BUILD instance…)."""
    kind = "conflict"


class OverLimit(InvalidRequest):
    """A quota would be exceeded."""
    kind = "over_limit"


class Unavailable(DbaasError):
    """No conductor answered, or the broker cannot be reached."""
    kind = "unavailable"


def not_found(kind: str, object_id) -> NotFound:
    """The one wording of "no such object", wherever it is found missing (the conductor, or
    the API for an id that cannot exist): another project's object must read the same."""
    return NotFound(f"no {kind} {str(object_id)[:64]!r}")


KINDS = {cls.kind: cls for cls in (DbaasError, InvalidRequest, NotFound, Conflict, OverLimit,
                                    Unavailable)}


def to_reply(exc: DbaasError) -> dict:
    return {"error": {"kind": exc.kind, "message": str(exc)}}


def from_reply(error) -> DbaasError:
    if not isinstance(error, dict):
        return DbaasError(f"malformed error from the conductor: {str(error)[:200]}")
    return KINDS.get(error.get("kind"), DbaasError)(str(error.get("message", ""))[:2000])
