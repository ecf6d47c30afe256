"""Engine, sessions and the one-transaction-per-unit-of-work helper.

SQLite is shared by several processes (conductors, CLI). Measured here: WAL plus a busy
timeout alone still lost updates under concurrent writers; every write transaction must
also start with ``BEGIN IMMEDIATE`` so writers queue on the database lock instead of
failing half-way. PostgreSQL needs none of that.
"""

import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from sqlalchemy import String, bindparam, cast, create_engine, event
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dbaas import settings as settings_module

log = logging.getLogger(__name__)
T = TypeVar("T")
_AFTER_COMMIT = "dbaas_after_commit"

# psycopg2 codes worth retrying: serialization failure, deadlock, and the admin/crash
# shutdown family a restarting server answers with.
RETRYABLE_PGCODES = {"40001", "40P01", "57P01", "57P02", "57P03"}


def array_parameter(name: str, item_type):
    """A PostgreSQL array bound as one text parameter (give it ``array_literal(values)``)
    and cast in SQL: psycopg2 then quotes one string instead of adapting each element
    (~1 µs each; a batch of heartbeats has hundreds)."""
    return cast(bindparam(name, type_=String), ARRAY(item_type))


def array_literal(values) -> str:
    """PostgreSQL's text form of an array of strings, finite floats or None (NULL)."""
    return "{" + ",".join(map(_array_element, values)) + "}"


def _array_element(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return repr(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_engine(url: str) -> Engine:
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; psycopg2 is what we ship.
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    # No pre-ping: run_transaction already retries on a dropped connection.
    return create_engine(url, pool_size=5, max_overflow=5)


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    # Hand transaction control to SQLAlchemy's "begin" event (BEGIN IMMEDIATE above).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_engine: Engine | None = None
_sessionmaker: sessionmaker | None = None


def engine() -> Engine:
    global _engine, _sessionmaker
    if _engine is None:
        _engine = make_engine(settings_module.get().database_url)
        _sessionmaker = sessionmaker(bind=_engine, expire_on_commit=False)
    return _engine


def dispose_after_fork() -> None:
    """A forked child must not reuse the parent's connections."""
    if _engine is not None:
        _engine.dispose(close=False)


@contextmanager
def session_scope(bind: Engine | None = None) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back when it raises."""
    if bind is None:
        engine()
        session = _sessionmaker()
    else:
        session = Session(bind=bind, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def after_commit(session: Session, action: Callable[[], object]) -> None:
    """Run ``action`` once the transaction of ``session`` (one ``run_transaction``) has
    committed: messages about a row are sent only when the row is there to be read."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


# Undefined table or column: the schema is missing or older than the code.
SCHEMA_PGCODES = {"42P01", "42703"}


def schema_missing(exc: BaseException) -> bool:
    """True when the database lacks the tables or columns the code expects: waiting will
    not help, `manage.py db upgrade` will."""
    if not isinstance(exc, DBAPIError):
        return False
    if getattr(exc.orig, "pgcode", None) in SCHEMA_PGCODES:
        return True
    return str(exc.orig).startswith(("no such table", "no such column"))  # SQLite


def is_retryable(exc: BaseException) -> bool:
    """True when the same transaction may succeed later (database away, lock, conflict)."""
    if not isinstance(exc, DBAPIError) or schema_missing(exc):
        return False
    if exc.connection_invalidated or isinstance(exc, OperationalError):
        return True
    return getattr(exc.orig, "pgcode", None) in RETRYABLE_PGCODES


def run_transaction(work: Callable[[Session], T], *, retry_for: float | None = None,
                    bind: Engine | None = None) -> T:
    """Run ``work(session)`` in one transaction, retrying with backoff while the database
    is unreachable or the transaction conflicts. Gives up (re-raises) after ``retry_for``
    seconds so the caller can hand the message back to the broker."""
    if retry_for is None:
        retry_for = settings_module.get().db_retry_seconds
    deadline = time.monotonic() + retry_for
    delay = 0.05
    while True:
        try:
            with session_scope(bind) as session:
                result = work(session)
            break
        except DBAPIError as exc:
            if not is_retryable(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable or busy (%s); retrying in %.2fs",
                        type(exc.orig).__name__, delay)
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 5.0)
    for action in session.info.get(_AFTER_COMMIT, ()):
        action()
    return result
