"""Per-key ordering watermarks: the check and the write are one statement.

``INSERT … ON CONFLICT DO UPDATE … WHERE watermarks.sent < excluded.sent RETURNING key``
returns exactly the keys whose message is newer than anything applied before. The row
lock it takes is held to the end of the transaction, so a concurrent conductor applying
a message for the same key waits and then re-evaluates against the committed value: an
older message can never be applied after a newer one. Keys are sorted so two batches
lock them in the same order and cannot deadlock.
"""

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dbaas.models import Watermark

HEARTBEAT = "heartbeat"
BACKUP = "backup"


def advance(session: Session, kind: str, sent_by_key: dict[str, float]) -> set[str]:
    """Raise each key's watermark to its ``sent`` where that is newer; return those keys."""
    if not sent_by_key:
        return set()
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    rows = [{"kind": kind, "key": key, "sent": sent_by_key[key]} for key in sorted(sent_by_key)]
    statement = insert(Watermark).values(rows)
    statement = statement.on_conflict_do_update(
        index_elements=[Watermark.kind, Watermark.key],
        set_={"sent": statement.excluded.sent},
        where=Watermark.sent < statement.excluded.sent,
    ).returning(Watermark.key)
    return set(session.scalars(statement))
