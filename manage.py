"""Operator command line of the control plane.

    python manage.py db upgrade
    python manage.py instance create NAME [--datastore sqlite|postgresql] [--restore-from BACKUP_ID]
                                          [--wait [--timeout S]] [--json]
    python manage.py instance list|show [ID] [--json]
    python manage.py instance delete|restart|reset-status ID
    python manage.py backup create INSTANCE_ID NAME [--wait [--timeout S]] [--json]
    python manage.py backup list|show [ID] [--json]
    python manage.py backup delete ID

It holds the database credentials (it is the operator's tool): it records requests
directly and, once they are committed, hands the work to the taskmanager.
"""

import argparse
import json
import os
import sys
import time
from typing import Callable

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from dbaas import db, instances, migrations, settings, wire
from dbaas.instances import InvalidRequest
from dbaas.models import Backup, Instance
from workers.guestagent import config as guest_config
from workers.taskmanager import api as taskmanager
from workers.taskmanager import guests

POLL_SECONDS = 0.5
IN_PROGRESS_BACKUP_STATES = frozenset(wire.BACKUP_STATE_RANK) - wire.FINAL_BACKUP_STATES


class Failed(Exception):
    """The command ran but did not reach the outcome asked for (an ERROR, a timeout)."""


def db_command(args) -> int:
    if args.action == "upgrade":
        migrations.upgrade()
    else:
        migrations.current()
    return 0


# --- instances -----------------------------------------------------------------------------

def instance_create(args) -> int:
    if args.restore_from and args.config_out:
        raise InvalidRequest("--restore-from needs the taskmanager to build the instance, "
                             "which --config-out leaves to you")
    config = settings.get()
    # The guest config is written before the instance commits: an instance whose
    # secret nobody received must not exist.
    with db.session_scope() as session:
        datastore, restore_location = args.datastore or "sqlite", None
        if args.restore_from:
            datastore, restore_location = restore_source(session, args.restore_from, args.datastore)
        instance, secret = instances.create_instance(session, args.name, datastore=datastore)
        view = instances.instance_view(instance)
        path = args.config_out or guests.config_path(view["id"])
        guest_config.write(path, guest_config.GuestConfig(
            instance_id=view["id"], secret=secret, broker_url=config.broker_url,
            conductor_queue=config.conductor_queue, datastore=view["datastore"],
            data_dir=os.path.join(os.path.dirname(path), "data"),
            backup_root=guests.backup_root(),
            heartbeat_interval=config.guest_heartbeat_interval))
    view["guest_config"] = path
    # With --config-out the operator runs the guest; otherwise the taskmanager does.
    if not args.config_out:
        taskmanager.create_instance(view["id"], datastore, restore_location)
    if args.wait:
        view = {**wait_for("instance", view["id"], read_instance, "status", {"ACTIVE", "ERROR"},
                           args.timeout), "guest_config": path}
    return print_result(view, args.json, failure=instance_failure(view))


def instance_failure(view: dict) -> str | None:
    if view["status"] != "ERROR":
        return None
    why = (view["fault"] or {}).get("message") or f"service status {view['service_status']}"
    return f"instance {view['id']} is ERROR: {why}"


def restore_source(session, backup_id: str, datastore: str | None) -> tuple[str, str]:
    """(datastore, location) of a backup a new instance may be restored from."""
    backup = get_backup(session, backup_id)
    if backup.state != "COMPLETED" or not backup.location:
        raise InvalidRequest(f"backup {backup_id} is {backup.state}: only a COMPLETED backup can be restored")
    source = session.get(Instance, backup.instance_id).datastore
    if datastore not in (None, source):
        raise InvalidRequest(f"backup {backup_id} is of a {source} instance, not {datastore}")
    return source, backup.location


def read_instance(instance_id: str) -> dict:
    with db.session_scope() as session:
        return instances.instance_view(instances.get_instance(session, instance_id))


def instance_show(args) -> int:
    print_views([read_instance(args.id)], args.json, single=True)
    return 0


def instance_list(args) -> int:
    with db.session_scope() as session:
        views = [instances.instance_view(i) for i in instances.list_instances(session)]
    print_views(views, args.json, single=False)
    return 0


def instance_delete(args) -> int:
    with db.session_scope() as session:
        instances.get_instance(session, args.id).task_status = "DELETING"
    taskmanager.delete_instance(args.id)
    print(f"deleting instance {args.id}")
    return 0


def instance_restart(args) -> int:
    read_instance(args.id)  # an unknown id is an error here, not a lost message later
    taskmanager.restart_instance(args.id)
    print(f"restarting instance {args.id}")
    return 0


def instance_reset_status(args) -> int:
    """Take an instance out of ERROR or a stuck task by hand; heartbeats set the rest."""
    with db.session_scope() as session:
        instance = instances.get_instance(session, args.id)
        done = []
        if instance.fault_kind:
            done.append(f"cleared fault {instance.fault_kind} ({instance.fault_message})")
            instance.fault_kind = instance.fault_message = instance.fault_at = None
        if instance.task_status != "NONE":
            done.append(f"task_status {instance.task_status} -> NONE")
            instance.task_status = "NONE"
        if instance.service_status in wire.STICKY_SERVICE_STATUSES:
            done.append(f"cleared service status {instance.service_status!r}")
            instance.service_status = None
    print(f"instance {args.id}: {'; '.join(done) or 'nothing to reset'}")
    return 0


# --- backups -------------------------------------------------------------------------------

def backup_view(backup: Backup) -> dict:
    return {
        "id": backup.id,
        "name": backup.name,
        "instance_id": backup.instance_id,
        "state": backup.state,
        "size": backup.size,
        "checksum": backup.checksum,
        "location": backup.location,
        "backup_type": backup.backup_type,
        "fail_reason": backup.fail_reason,
        "created": instances.iso_utc(backup.created),
        "updated": instances.iso_utc(backup.updated),
    }


def get_backup(session, backup_id: str) -> Backup:
    backup = session.get(Backup, backup_id)
    if backup is None or backup.deleted:
        raise InvalidRequest(f"no backup {backup_id!r}")
    return backup


def read_backup(backup_id: str) -> dict:
    with db.session_scope() as session:
        return backup_view(get_backup(session, backup_id))


def backup_create(args) -> int:
    try:
        name = instances.validate_name(args.name)
    except InvalidRequest:
        raise InvalidRequest(f"backup name must be 1 to {instances.MAX_NAME_LENGTH} printable characters") from None
    with db.session_scope() as session:
        instance = instances.get_instance(session, args.instance)
        status = instances.instance_view(instance)["status"]
        if status != "ACTIVE":
            raise InvalidRequest(f"instance {args.instance} is {status}: only an ACTIVE instance can be backed up")
        backup = Backup(instance_id=instance.id, tenant_id=instance.tenant_id, name=name,
                        description=args.description)
        session.add(backup)
        session.flush()
        view = backup_view(backup)
    taskmanager.create_backup(view["id"], view["instance_id"])
    if args.wait:
        view = wait_for("backup", view["id"], read_backup, "state", wire.FINAL_BACKUP_STATES,
                        args.timeout)
    failure = f"backup {view['id']} FAILED: {view['fail_reason']}" if view["state"] == "FAILED" else None
    return print_result(view, args.json, failure)


def backup_show(args) -> int:
    print_views([read_backup(args.id)], args.json, single=True)
    return 0


def backup_list(args) -> int:
    with db.session_scope() as session:
        views = [backup_view(b) for b in session.scalars(
            select(Backup).where(Backup.deleted.is_(False)).order_by(Backup.created))]
    print_views(views, args.json, single=False, columns=BACKUP_COLUMNS)
    return 0


def backup_delete(args) -> int:
    with db.session_scope() as session:
        backup = get_backup(session, args.id)
        if backup.state in IN_PROGRESS_BACKUP_STATES:
            raise InvalidRequest(f"backup {args.id} is {backup.state}: wait until it is COMPLETED or FAILED")
        location = backup.location
    taskmanager.delete_backup(args.id, location)
    print(f"deleting backup {args.id}")
    return 0


# --- waiting and output --------------------------------------------------------------------

def wait_for(kind: str, object_id: str, read: Callable[[str], dict], field: str,
             ends: set[str] | frozenset[str], timeout: float) -> dict:
    """Poll until ``read(object_id)[field]`` is one of ``ends``; print each change on stderr
    (stdout keeps the result, e.g. for --json)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        view = read(object_id)
        if view[field] != last:
            last = view[field]
            print(f"{kind} {object_id}: {last}", file=sys.stderr, flush=True)
        if last in ends:
            return view
        if time.monotonic() > deadline:
            raise Failed(f"{kind} {object_id} still {last} after {timeout:.0f}s")
        time.sleep(POLL_SECONDS)


def print_result(view: dict, as_json: bool, failure: str | None) -> int:
    print_views([view], as_json, single=True)
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


INSTANCE_COLUMNS = ("id", "name", "datastore", "status", "operating_status", "last_heartbeat")
BACKUP_COLUMNS = ("id", "name", "instance_id", "state", "size", "created")


def print_views(views: list[dict], as_json: bool, single: bool,
                columns: tuple[str, ...] = INSTANCE_COLUMNS) -> None:
    if as_json:
        print(json.dumps(views[0] if single else views, indent=2))
    elif single:
        for key, value in views[0].items():
            print(f"{key:>20}  {'' if value is None else value}")
    else:
        rows = [columns] + [tuple("" if v.get(c) is None else str(v[c]) for c in columns) for v in views]
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def parse_args(argv):
    config = settings.get()
    parser = argparse.ArgumentParser(prog="python manage.py")
    groups = parser.add_subparsers(dest="group", required=True)

    database = groups.add_parser("db", help="database schema")
    database.add_argument("action", choices=("upgrade", "current"))
    database.set_defaults(handler=db_command)

    instance = groups.add_parser("instance", help="database instances").add_subparsers(
        dest="action", required=True)
    create = command(instance, "create", instance_create, "record an instance; the taskmanager builds it",
                     with_json=True)
    create.add_argument("name")
    create.add_argument("--datastore", help="sqlite (default) or postgresql; "
                        "with --restore-from, that of the backup's instance")
    create.add_argument("--restore-from", metavar="BACKUP_ID", help="fill it from a COMPLETED backup")
    create.add_argument("--config-out", help="write the guest config here and run the guest "
                        "yourself (the taskmanager does not build it)")
    # By then the build-timeout sweep has decided: waiting longer cannot change the outcome.
    add_wait(create, "until ACTIVE (exit 0) or ERROR (exit 1)",
             config.usage_timeout + 2 * config.sweep_interval)
    command(instance, "list", instance_list, with_json=True)
    command(instance, "show", instance_show, with_id=True, with_json=True)
    command(instance, "delete", instance_delete, "stop and remove the instance", with_id=True)
    command(instance, "restart", instance_restart, "restart the instance's datastore", with_id=True)
    command(instance, "reset-status", instance_reset_status,
            "clear a fault, the task status and a 'restart required' status", with_id=True)

    backup = groups.add_parser("backup", help="backups of instances").add_subparsers(
        dest="action", required=True)
    create = command(backup, "create", backup_create, "back up an ACTIVE instance", with_json=True)
    create.add_argument("instance", metavar="INSTANCE_ID")
    create.add_argument("name")
    create.add_argument("--description")
    add_wait(create, "until COMPLETED (exit 0) or FAILED (exit 1)",
             config.backup_timeout + 2 * config.sweep_interval)
    command(backup, "list", backup_list, with_json=True)
    command(backup, "show", backup_show, with_id=True, with_json=True)
    command(backup, "delete", backup_delete, "remove a backup and its file", with_id=True)
    return parser.parse_args(argv)


def command(actions, name: str, handler, text: str | None = None, with_id: bool = False,
            with_json: bool = False):
    sub = actions.add_parser(name, help=text)
    if with_id:
        sub.add_argument("id")
    if with_json:
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.set_defaults(handler=handler)
    return sub


def add_wait(parser, until: str, default_timeout: float) -> None:
    parser.add_argument("--wait", action="store_true", help=f"wait {until}, printing each change")
    parser.add_argument("--timeout", type=float, default=default_timeout,
                        help="seconds --wait waits at most (default: %(default).0f)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return args.handler(args)
    except (InvalidRequest, Failed, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokerError as exc:
        print(f"error: broker unreachable, the request was recorded but not handed over: {exc}",
              file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        print(f"error: database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}\n"
              f"(is the schema up to date? run: python manage.py db upgrade)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
