"""conductor.heartbeat: liveness and datastore status, many heartbeats per transaction."""

import time
from datetime import datetime
from functools import cache

from sqlalchemy import DateTime, String, and_, bindparam, case, column, func, or_, update, values
from sqlalchemy.orm import Session

from dbaas import db, settings, wire
from dbaas.models import Instance, utcnow
from dbaas.status import ALIVE_SERVICE_STATUSES, HEARTBEAT_EXPIRED, RESTART_UNDER_WAY
from workers.conductor import ordering
from workers.conductor.messages import Heartbeat, MessageRejected, parse_heartbeat


def apply_heartbeats(session: Session, heartbeats: list[Heartbeat], now: datetime) -> set[str]:
    """Apply heartbeats as if one at a time in ``sent`` order; return the instances changed.

    A multi-row UPSERT may not touch a row twice, so each instance's heartbeats collapse
    to the newest — except that a sticky status reported by an older one of the batch
    must still win over the newer ones, so that one is applied in a pass of its own first.
    """
    newest: dict[str, Heartbeat] = {}
    newest_sticky: dict[str, Heartbeat] = {}
    for beat in heartbeats:
        if beat.instance_id not in newest or beat.sent > newest[beat.instance_id].sent:
            newest[beat.instance_id] = beat
        if beat.service_status in wire.STICKY_SERVICE_STATUSES and (
                beat.instance_id not in newest_sticky
                or beat.sent > newest_sticky[beat.instance_id].sent):
            newest_sticky[beat.instance_id] = beat
    earlier_sticky = {i: beat for i, beat in newest_sticky.items() if beat is not newest[i]}
    applied = set()
    for batch in (earlier_sticky, newest):
        applied |= _apply_newest(session, batch, now)
    return applied


def _apply_newest(session: Session, newest: dict[str, Heartbeat], now: datetime) -> set[str]:
    applied = ordering.advance(
        session, ordering.HEARTBEAT, {i: beat.sent for i, beat in newest.items()})
    if not applied:
        return applied
    keys = sorted(applied)
    statuses = [newest[k].service_status for k in keys]
    versions = [newest[k].guest_agent_version for k in keys]
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_postgresql_update(),
                        {"keys": db.array_literal(keys), "statuses": db.array_literal(statuses),
                         "versions": db.array_literal(versions), "now": now})
    else:
        # A CTE: SQLite takes no column names after a VALUES subquery's alias.
        beats = values(column("key", String), column("status", String), column("version", String),
                       name="beats").data(list(zip(keys, statuses, versions))).cte("beats")
        session.execute(_update(beats), {"now": now})
    return applied


@cache
def _postgresql_update():
    """The batch as array parameters: one SQL text for any batch, compiled once (SQLite
    takes the rows as VALUES)."""
    beats = func.unnest(db.array_parameter("keys", String), db.array_parameter("statuses", String),
                        db.array_parameter("versions", String)
                        ).table_valued("key", "status", "version").render_derived("beats")
    return _update(beats)


def _update(beats):
    """One UPDATE for a whole batch, each instance from its own row of ``beats`` (key,
    status, version; status and version are null in a liveness-only heartbeat)."""
    status, version, now = beats.c.status, beats.c.version, bindparam("now", type_=DateTime)
    # Only the control plane clears a sticky status such as "restart required".
    keep_status = or_(status.is_(None),
                      Instance.service_status.in_(sorted(wire.STICKY_SERVICE_STATUSES)))
    alive = status.in_(sorted(ALIVE_SERVICE_STATUSES))
    expired = and_(alive, Instance.fault_kind == HEARTBEAT_EXPIRED)
    return (
        update(Instance)
        .where(Instance.id == beats.c.key, Instance.deleted.is_(False))
        .values(
            last_heartbeat=now,
            guest_agent_version=func.coalesce(version, Instance.guest_agent_version),
            service_status=case((keep_status, Instance.service_status), else_=status),
            service_status_updated=case((keep_status, Instance.service_status_updated), else_=now),
            # A build ends when the datastore answers; a restart when the guest reports
            # anything but that it is still under way (a datastore that did not come back
            # ends it too).
            task_status=case(
                (and_(alive, Instance.task_status == "BUILDING"), "NONE"),
                (and_(status.is_not(None), status.not_in(sorted(RESTART_UNDER_WAY)),
                      Instance.task_status == "REBOOTING"), "NONE"),
                else_=Instance.task_status),
            fault_kind=case((expired, None), else_=Instance.fault_kind),
            fault_message=case((expired, None), else_=Instance.fault_message),
            fault_at=case((expired, None), else_=Instance.fault_at),
        )
        .execution_options(synchronize_session=False)
    )


def handle(session: Session, tasks: list, now: datetime | None = None) -> tuple[list, int]:
    """Validate and apply a batch of conductor.heartbeat messages whose senders were
    already verified (dbaas.intake) and found live: one verdict per message — None when
    handled (applied, or stale and discarded), otherwise why it was refused — and how many
    instances it changed."""
    max_skew = settings.get().max_clock_skew
    epoch_now = time.time()
    verdicts: list = [None] * len(tasks)
    beats = []
    for index, task in enumerate(tasks):
        try:
            beats.append(parse_heartbeat(task.args, task.kwargs, epoch_now, max_skew))
        except MessageRejected as exc:
            verdicts[index] = str(exc)
    return verdicts, len(apply_heartbeats(session, beats, now or utcnow()))
