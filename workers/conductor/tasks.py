"""Every task the conductor serves, by its public name. Bodies only hand over to the
modules that hold the logic."""

from dbaas import settings, wire
from dbaas.celery import app
from dbaas.models import utcnow
from workers.conductor import backups, crud, heartbeats, sweeps
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


@app.task(name="conductor.sweep", base=ConductorTask)
def sweep(session, principal: Principal):
    config = settings.get()
    return sweeps.sweep(session, utcnow(), usage_timeout=config.usage_timeout,
                        agent_heartbeat_expiry=config.agent_heartbeat_expiry,
                        backup_timeout=config.backup_timeout)


@app.task(name="conductor.instance_delete", base=ConductorTask)
def instance_delete(session, principal: Principal, instance_id: str):
    crud.instance_delete(session, instance_id, utcnow())


@app.task(name="conductor.backup_delete", base=ConductorTask)
def backup_delete(session, principal: Principal, backup_id: str):
    crud.backup_delete(session, backup_id, utcnow())


@app.task(name="conductor.backup_fail", base=ConductorTask)
def backup_fail(session, principal: Principal, backup_id: str, reason: str):
    crud.backup_fail(session, backup_id, reason, utcnow())
