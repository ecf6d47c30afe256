"""Timeout sweeps, run by the conductor when beat asks.

Each is one conditional UPDATE (or DELETE): running it twice — two beats, a duplicated
tick, a redelivered message — changes nothing the first run did not, and it needs no
process to remember anything, so a taskmanager restart cannot stop a timeout.
"""

from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from dbaas.models import Backup, Instance, Watermark
from dbaas.status import ALIVE_SERVICE_STATUSES, HEARTBEAT_EXPIRED
from workers.conductor import ordering

BUILD_TIMEOUT = "build_timeout"
RESTART_TIMEOUT = "restart_timeout"


def _fault(session: Session, now: datetime, kind: str, message: str, *conditions) -> int:
    """Set a fault on live instances without one that match ``conditions``."""
    return session.execute(
        update(Instance)
        .where(Instance.deleted.is_(False), Instance.fault_kind.is_(None), *conditions)
        .values(fault_kind=kind, fault_at=now, fault_message=message)
        .execution_options(synchronize_session=False)
    ).rowcount


def expire_builds(session: Session, now: datetime, usage_timeout: float) -> int:
    """Instances still BUILD after ``usage_timeout`` → ERROR."""
    return _fault(session, now, BUILD_TIMEOUT,
                  f"no running heartbeat within {usage_timeout:.0f}s of creation",
                  Instance.task_status == "BUILDING",
                  Instance.created < now - timedelta(seconds=usage_timeout))


def expire_heartbeats(session: Session, now: datetime, expiry: float) -> int:
    """ACTIVE instances whose guest went quiet → ERROR; valid heartbeats clear it."""
    return _fault(session, now, HEARTBEAT_EXPIRED,
                  f"no heartbeat from the guest agent for over {expiry:.0f}s",
                  Instance.task_status == "NONE",
                  Instance.service_status.in_(ALIVE_SERVICE_STATUSES),
                  Instance.last_heartbeat < now - timedelta(seconds=expiry))


def expire_restarts(session: Session, now: datetime, expiry: float) -> int:
    """Instances restarting (REBOOT) whose guest reported nothing for ``expiry`` → ERROR.
    Every report of the guest writes the row (``updated``); a restart that never brings a
    guest back writes nothing after the restart itself."""
    return _fault(session, now, RESTART_TIMEOUT,
                  f"no report from the guest agent within {expiry:.0f}s of the restart",
                  Instance.task_status == "REBOOTING",
                  Instance.updated < now - timedelta(seconds=expiry))


def expire_backups(session: Session, now: datetime, backup_timeout: float) -> int:
    """Backups NEW or BUILDING past their timeout → FAILED (final: a late guest report
    cannot revive them)."""
    return session.execute(
        update(Backup)
        .where(Backup.deleted.is_(False), Backup.state.in_(("NEW", "BUILDING")),
               Backup.created < now - timedelta(seconds=backup_timeout))
        .values(state="FAILED", updated=now,
                fail_reason=f"not completed within {backup_timeout:.0f}s")
        .execution_options(synchronize_session=False)
    ).rowcount


def remove_deleted_watermarks(session: Session) -> int:
    deleted_instances = select(Instance.id).where(Instance.deleted.is_(True))
    deleted_backups = select(Backup.id).where(
        or_(Backup.deleted.is_(True), Backup.instance_id.in_(deleted_instances)))
    return session.execute(
        delete(Watermark)
        .where(or_(
            (Watermark.kind == ordering.HEARTBEAT) & Watermark.key.in_(deleted_instances),
            (Watermark.kind == ordering.BACKUP) & Watermark.key.in_(deleted_backups),
        ))
        .execution_options(synchronize_session=False)
    ).rowcount


def sweep(session: Session, now: datetime, *, usage_timeout: float, agent_heartbeat_expiry: float,
          backup_timeout: float) -> dict[str, int]:
    return {
        "build_timeouts": expire_builds(session, now, usage_timeout),
        "heartbeat_expiries": expire_heartbeats(session, now, agent_heartbeat_expiry),
        "restart_timeouts": expire_restarts(session, now, agent_heartbeat_expiry),
        "backup_timeouts": expire_backups(session, now, backup_timeout),
        "watermarks_removed": remove_deleted_watermarks(session),
    }
