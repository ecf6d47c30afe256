"""Every task the conductor serves, by its public name. Bodies only hand over to the
modules that hold the logic."""

from dbaas import wire
from dbaas.celery import app
from workers.conductor import backups, crud, heartbeats
from workers.conductor.auth import Principal
from workers.conductor.batching import BatchedTask
from workers.conductor.task_base import ConductorTask


@app.task(name=wire.HEARTBEAT_TASK, base=BatchedTask)
def heartbeat(session, envelopes):
    return heartbeats.handle_heartbeats(session, envelopes)


@app.task(name=wire.UPDATE_BACKUP_TASK, base=ConductorTask)
def update_backup(session, principal: Principal, *args, **kwargs):
    backups.handle_backup_update(session, args, kwargs)


@app.task(name="conductor.instance_update", base=ConductorTask)
def instance_update(session, principal: Principal, instance_id: str, **fields):
    crud.instance_update(session, instance_id, fields)


@app.task(name="conductor.backup_create", base=ConductorTask)
def backup_create(session, principal: Principal, backup_id: str, instance_id: str, name: str,
                  description: str | None = None):
    crud.backup_create(session, backup_id, instance_id, name, description)
