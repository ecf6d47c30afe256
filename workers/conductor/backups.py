"""conductor.update_backup: a guest reports progress of a backup of its own instance."""

import time
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dbaas import settings, wire
from dbaas.models import Backup, utcnow
from workers.conductor import ordering
from workers.conductor.messages import BackupUpdate, MessageRejected, parse_backup_update


def apply_backup_update(session: Session, change: BackupUpdate, now: datetime) -> bool:
    """Apply ``change`` if it is the newest for its backup; False when it was stale.

    Raises MessageRejected (and the caller rolls back) when the backup is not the
    sender's or the state would move backwards.
    """
    backup = session.scalar(
        select(Backup).where(Backup.id == change.backup_id).with_for_update())
    if backup is None or backup.deleted:
        raise MessageRejected(f"backup {change.backup_id} does not exist")
    if backup.instance_id != change.instance_id:
        raise MessageRejected(f"backup {change.backup_id} does not belong to the sender's instance")
    if not ordering.advance(session, ordering.BACKUP, {backup.id: change.sent}):
        return False
    new_state = change.fields.get("state", backup.state)
    if backup.state in wire.FINAL_BACKUP_STATES:
        raise MessageRejected(f"backup is already {backup.state}")
    if wire.BACKUP_STATE_RANK[new_state] < wire.BACKUP_STATE_RANK[backup.state]:
        raise MessageRejected(f"backup state may not move from {backup.state} to {new_state}")
    for name, value in change.fields.items():
        setattr(backup, name, value)
    backup.updated = now
    return True


def handle_backup_update(session: Session, args, kwargs, now: datetime | None = None) -> bool:
    """Validate and apply one conductor.update_backup message (already authenticated)."""
    change = parse_backup_update(args, kwargs, time.time(), settings.get().max_clock_skew)
    return apply_backup_update(session, change, now or utcnow())
