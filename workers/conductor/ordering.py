"""Per-key ordering watermarks: the check and the write are one statement.

``INSERT … ON CONFLICT DO UPDATE … WHERE watermarks.sent < excluded.sent RETURNING key``
returns exactly the keys whose message is newer than anything applied before. The row
lock it takes is held to the end of the transaction, so a concurrent conductor applying
a message for the same key waits and then re-evaluates against the committed value: an
older message can never be applied after a newer one. Keys are sorted so two batches
lock them in the same order and cannot deadlock.
"""

from functools import cache

from sqlalchemy import Float, String, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dbaas import db
from dbaas.models import Watermark

WATERMARKS = Watermark.__table__
HEARTBEAT = "heartbeat"
BACKUP = "backup"


def advance(session: Session, kind: str, sent_by_key: dict[str, float]) -> set[str]:
    """Raise each key's watermark to its ``sent`` where that is newer; return those keys."""
    if not sent_by_key:
        return set()
    keys = sorted(sent_by_key)
    if session.get_bind().dialect.name == "postgresql":
        statement = _postgresql_upsert()
        params = {"kind": kind, "keys": db.array_literal(keys),
                  "sents": db.array_literal([float(sent_by_key[k]) for k in keys])}
    else:
        statement = _upsert(sqlite.insert(WATERMARKS).values(
            [{"kind": kind, "key": key, "sent": sent_by_key[key]} for key in keys]))
        params = {}
    return set(session.scalars(statement, params))


def _upsert(statement):
    return statement.on_conflict_do_update(
        index_elements=[WATERMARKS.c.kind, WATERMARKS.c.key],
        set_={"sent": statement.excluded.sent},
        where=WATERMARKS.c.sent < statement.excluded.sent,
    ).returning(WATERMARKS.c.key)


@cache
def _postgresql_upsert():
    """The rows as two array parameters: one SQL text for any batch size, so the
    statement is compiled once instead of once per batch (a third of the conductor's
    CPU went to compiling multi-row VALUES of varying length)."""
    rows = func.unnest(db.array_parameter("keys", String),
                       db.array_parameter("sents", Float)).table_valued("key", "sent").render_derived("row")
    chosen = select(bindparam("kind", type_=String), rows.c.key, rows.c.sent).order_by(rows.c.key)
    return _upsert(postgresql.insert(WATERMARKS).from_select(["kind", "key", "sent"], chosen))
