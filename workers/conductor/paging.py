"""Lists in pages, oldest first: ``limit`` items after the ``marker`` (the id of the last item
of the previous page, exclusive, as in Trove). Ordered by (created, id), so a page never
repeats or skips an item when others are created or deleted meanwhile."""

from sqlalchemy import and_, or_
from sqlalchemy.orm import Session

from dbaas.errors import InvalidRequest

MAX_LIMIT = 10_000


def validate_limit(limit) -> int | None:
    if limit is None or (type(limit) is int and 0 < limit <= MAX_LIMIT):
        return limit
    raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")


def page(session: Session, statement, model, project_id: str | None, limit, marker):
    """``statement`` (a select of ``model`` rows) ordered, after ``marker`` and cut to
    ``limit``. The marker may have been deleted since (its place in the order remains),
    but must be of the project."""
    limit = validate_limit(limit)
    if marker is not None:
        after = None
        if isinstance(marker, str) and len(marker) <= 64 and marker.isprintable():
            after = session.get(model, marker)
        if after is None or project_id not in (None, after.tenant_id):
            raise InvalidRequest(f"marker {str(marker)[:64]!r} not found")
        statement = statement.where(or_(model.created > after.created,
                                        and_(model.created == after.created, model.id > after.id)))
    statement = statement.order_by(model.created, model.id)
    return statement if limit is None else statement.limit(limit)
