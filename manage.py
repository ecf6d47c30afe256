"""Operator command line of the control plane.

    python manage.py db upgrade|current
    python manage.py settings
    python manage.py instance create NAME [--datastore sqlite|postgresql] [--restore-from BACKUP_ID]
                                          [--project P] [--wait [--timeout S]] [--json]
    python manage.py instance list|show [ID] [--json]
    python manage.py instance delete|restart|reset-status ID
    python manage.py backup create INSTANCE_ID NAME [--description D] [--wait [--timeout S]] [--json]
    python manage.py backup list|show [ID] [--json]
    python manage.py backup delete ID

A client of the conductor like the REST API (workers/conductor/api.py): it parses arguments
and presents answers; every rule lives in the conductor. Only ``db`` opens the database.
"""

import argparse
import json
import sys
import time
import uuid
from typing import Callable

from dbaas import errors, settings, wire

POLL_SECONDS = 0.5


class Failed(Exception):
    """The command ran but did not reach the outcome asked for (an ERROR, a timeout)."""


def conductor():
    from dbaas.celery import app
    from workers.conductor.api import ConductorAPI
    return ConductorAPI(app)


def db_command(args) -> int:
    from dbaas import migrations  # the one command that needs the database layer
    if args.action == "upgrade":
        migrations.upgrade()
    else:
        migrations.current()
    return 0


def settings_command(_args) -> int:
    print(settings.markdown_table())
    return 0


# --- instances -----------------------------------------------------------------------------

def instance_create(args) -> int:
    view = conductor().instance_create(str(uuid.uuid4()), args.name, datastore=args.datastore,
                                       restore_from=args.restore_from, project_id=args.project)
    if args.wait:
        view = wait_for("instance", view["id"], conductor().instance_show, "status",
                        {"ACTIVE", "ERROR"}, args.timeout)
    return print_result(view, args.json, failure=instance_failure(view))


def instance_failure(view: dict) -> str | None:
    if view["status"] != "ERROR":
        return None
    why = (view["fault"] or {}).get("message") or f"service status {view['service_status']}"
    return f"instance {view['id']} is ERROR: {why}"


def instance_show(args) -> int:
    print_views([conductor().instance_show(args.id)], args.json, single=True)
    return 0


def instance_list(args) -> int:
    print_views(conductor().instance_list(), args.json, single=False)
    return 0


def instance_delete(args) -> int:
    conductor().instance_delete(args.id)
    print(f"deleting instance {args.id}")
    return 0


def instance_restart(args) -> int:
    conductor().instance_restart(args.id)
    print(f"restarting instance {args.id}")
    return 0


def instance_reset_status(args) -> int:
    cleared = conductor().instance_reset_status(args.id)["cleared"]
    print(f"instance {args.id}: {'; '.join(cleared) or 'nothing to reset'}")
    return 0


# --- backups -------------------------------------------------------------------------------

def backup_create(args) -> int:
    view = conductor().backup_create(str(uuid.uuid4()), args.instance, args.name,
                                     description=args.description)
    if args.wait:
        view = wait_for("backup", view["id"], conductor().backup_show, "state",
                        wire.FINAL_BACKUP_STATES, args.timeout)
    failure = f"backup {view['id']} FAILED: {view['fail_reason']}" if view["state"] == "FAILED" else None
    return print_result(view, args.json, failure)


def backup_show(args) -> int:
    print_views([conductor().backup_show(args.id)], args.json, single=True)
    return 0


def backup_list(args) -> int:
    print_views(conductor().backup_list(instance_id=args.instance), args.json, single=False,
                columns=BACKUP_COLUMNS)
    return 0


def backup_delete(args) -> int:
    conductor().backup_delete(args.id)
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


# --- arguments -----------------------------------------------------------------------------

def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def parse_args(argv):
    config = settings.get()
    parser = argparse.ArgumentParser(prog="python manage.py")
    groups = parser.add_subparsers(dest="group", required=True)

    database = groups.add_parser("db", help="database schema (needs DBAAS_DATABASE_URL)")
    database.add_argument("action", choices=("upgrade", "current"))
    database.set_defaults(handler=db_command)
    groups.add_parser("settings", help="every setting, as the README's table").set_defaults(
        handler=settings_command)

    instance = groups.add_parser("instance", help="database instances").add_subparsers(
        dest="action", required=True)
    create = command(instance, "create", instance_create, "record an instance; the taskmanager builds it",
                     with_json=True)
    create.add_argument("name")
    create.add_argument("--datastore", help="sqlite (default) or postgresql; "
                        "with --restore-from, that of the backup's instance")
    create.add_argument("--restore-from", metavar="BACKUP_ID", help="fill it from a COMPLETED backup")
    create.add_argument("--project", help="the project it belongs to (default: default)")
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
    listing = command(backup, "list", backup_list, with_json=True)
    listing.add_argument("--instance", metavar="INSTANCE_ID", help="only this instance's backups")
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
    parser.add_argument("--timeout", type=positive_seconds, default=default_timeout,
                        help="seconds --wait waits at most (default: %(default).0f)")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        return args.handler(args)
    except (errors.DbaasError, Failed, OSError, settings.SettingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
