"""conductor.heartbeat: liveness and datastore status, many heartbeats per transaction."""

import time
from collections import defaultdict
from datetime import datetime

from sqlalchemy import case, update
from sqlalchemy.orm import Session

from dbaas import settings, wire
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
    # Most heartbeats of a batch say the same thing: one UPDATE per distinct content.
    groups: dict[tuple, list[str]] = defaultdict(list)
    for instance_id in sorted(applied):
        beat = newest[instance_id]
        groups[(beat.service_status, beat.guest_agent_version)].append(instance_id)
    for (status, version), instance_ids in groups.items():
        session.execute(
            update(Instance)
            .where(Instance.id.in_(instance_ids), Instance.deleted.is_(False))
            .values(_heartbeat_values(status, version, now))
            .execution_options(synchronize_session=False)
        )
    return applied


def _heartbeat_values(status: str | None, version: str | None, now: datetime) -> dict:
    values: dict = {"last_heartbeat": now}
    if version is not None:
        values["guest_agent_version"] = version
    if status is None:
        return values
    # Only the control plane clears a sticky status such as "restart required".
    sticky = Instance.service_status.in_(wire.STICKY_SERVICE_STATUSES)
    values["service_status"] = case((sticky, Instance.service_status), else_=status)
    values["service_status_updated"] = case((sticky, Instance.service_status_updated), else_=now)
    # A build ends when the datastore answers; a restart when the guest reports anything
    # but that it is still under way (a datastore that did not come back ends it too).
    ended = ({"BUILDING"} if status in ALIVE_SERVICE_STATUSES else set()) | (
        set() if status in RESTART_UNDER_WAY else {"REBOOTING"})
    if ended:
        values["task_status"] = case(
            (Instance.task_status.in_(sorted(ended)), "NONE"), else_=Instance.task_status)
    if status in ALIVE_SERVICE_STATUSES:
        expired = Instance.fault_kind == HEARTBEAT_EXPIRED
        values["fault_kind"] = case((expired, None), else_=Instance.fault_kind)
        values["fault_message"] = case((expired, None), else_=Instance.fault_message)
        values["fault_at"] = case((expired, None), else_=Instance.fault_at)
    return values


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
