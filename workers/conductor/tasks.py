"""Every task the conductor serves, by its public name (``api.py`` holds the names).
Bodies only hand over to the modules that hold the logic.

Guests' messages (``conductor.heartbeat``, ``conductor.update_backup``: dbaas.wire) are not
Celery tasks: the guests' queue has a consumer of its own, registered here.
"""

from celery import signals

from dbaas import db, settings
from dbaas.celery import app
from workers.conductor import api, manager, metrics
from workers.conductor.auth import Principal
from workers.conductor.consumer import GuestQueue
from workers.conductor.task_base import ConductorCall, ConductorTask

app.steps["consumer"].add(GuestQueue)
# This module is imported by conductor workers only: they and their pool processes keep
# their metrics in files that the main process serves.
metrics.use_private_directory()


@signals.worker_ready.connect
def serve_metrics(**_):
    config = settings.get()
    metrics.serve([config.conductor_queue, config.conductor_control_queue, config.taskmanager_queue])


# --- calls from the control plane


@app.task(name=api.INSTANCE_CREATE, base=ConductorCall)
def instance_create(session, principal: Principal, instance_id, name, datastore=None,
                    restore_from=None, project_id=None, datastore_version=None, flavor_id=None,
                    volume_size=None):
    return manager.instance_create(session, instance_id, name, datastore, restore_from, project_id,
                                   datastore_version, flavor_id, volume_size)


@app.task(name=api.INSTANCE_SHOW, base=ConductorCall)
def instance_show(session, principal: Principal, instance_id, project_id=None):
    return manager.instance_show(session, instance_id, project_id)


@app.task(name=api.INSTANCE_LIST, base=ConductorCall)
def instance_list(session, principal: Principal, project_id=None, limit=None, marker=None):
    return manager.instance_list(session, project_id, limit, marker)


@app.task(name=api.INSTANCE_COUNTS, base=ConductorCall)
def instance_counts(session, principal: Principal):
    return manager.instance_counts(session)


@app.task(name=api.INSTANCE_DELETE, base=ConductorCall)
def instance_delete(session, principal: Principal, instance_id, project_id=None):
    return manager.instance_delete(session, instance_id, project_id)


@app.task(name=api.INSTANCE_RESTART, base=ConductorCall)
def instance_restart(session, principal: Principal, instance_id, project_id=None):
    return manager.instance_restart(session, instance_id, project_id)


@app.task(name=api.INSTANCE_RESET_STATUS, base=ConductorCall)
def instance_reset_status(session, principal: Principal, instance_id, project_id=None):
    return manager.instance_reset_status(session, instance_id, project_id)


@app.task(name=api.INSTANCE_RESET_PASSWORD, base=ConductorCall)
def instance_reset_password(session, principal: Principal, instance_id, project_id=None):
    return manager.instance_reset_password(session, instance_id, project_id)


@app.task(name=api.INSTANCE_GUESTS, base=ConductorCall)
def instance_guests(session, principal: Principal, limit=None, marker=None):
    return manager.instance_guests(session, limit, marker)


@app.task(name=api.BACKUP_CREATE, base=ConductorCall)
def backup_create(session, principal: Principal, backup_id, instance_id, name, description=None,
                  project_id=None):
    return manager.backup_create(session, backup_id, instance_id, name, description, project_id)


@app.task(name=api.BACKUP_SHOW, base=ConductorCall)
def backup_show(session, principal: Principal, backup_id, project_id=None):
    return manager.backup_show(session, backup_id, project_id)


@app.task(name=api.BACKUP_LIST, base=ConductorCall)
def backup_list(session, principal: Principal, project_id=None, instance_id=None, datastore=None,
                limit=None, marker=None):
    return manager.backup_list(session, project_id, instance_id, datastore, limit, marker)


@app.task(name=api.BACKUP_DELETE, base=ConductorCall)
def backup_delete(session, principal: Principal, backup_id, project_id=None):
    return manager.backup_delete(session, backup_id, project_id)


@app.task(name=api.QUOTA_SHOW, base=ConductorCall)
def quota_show(session, principal: Principal, project_id):
    return manager.quota_show(session, project_id)


@app.task(name=api.QUOTA_UPDATE, base=ConductorCall)
def quota_update(session, principal: Principal, project_id, **limits):
    return manager.quota_update(session, project_id, limits)


# --- casts from the taskmanager and beat


@app.task(name=api.INSTANCE_UPDATE, base=ConductorTask)
def instance_update(session, principal: Principal, instance_id, **fields):
    manager.instance_update(session, instance_id, fields)


@app.task(name=api.INSTANCE_DELETED, base=ConductorTask)
def instance_deleted(session, principal: Principal, instance_id):
    manager.instance_deleted(session, instance_id)


@app.task(name=api.BACKUP_FAIL, base=ConductorTask)
def backup_fail(session, principal: Principal, backup_id, reason):
    manager.backup_fail(session, backup_id, reason)


@app.task(name=api.BACKUP_DELETED, base=ConductorTask)
def backup_deleted(session, principal: Principal, backup_id):
    manager.backup_deleted(session, backup_id)


@app.task(name=api.SWEEP, base=ConductorTask)
def sweep(session, principal: Principal):
    config = settings.get()
    changes = manager.sweep(session, usage_timeout=config.usage_timeout,
                            agent_heartbeat_expiry=config.agent_heartbeat_expiry,
                            backup_timeout=config.backup_timeout)
    db.after_commit(session, lambda: metrics.sweep_done(changes))
    return changes
