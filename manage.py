"""Operator command line of the control plane.

    python manage.py db upgrade|current
    python manage.py settings
    python manage.py instance create NAME [--datastore sqlite|postgresql] [--restore-from BACKUP_ID]
                                          [--project P] [--flavor ID] [--size GB]
                                          [--wait [--timeout S]] [--json]
    python manage.py instance list|show [ID] [--json]
    python manage.py instance delete|reset-status ID
    python manage.py instance restart ID [--wait [--timeout S]] [--json]
    python manage.py instance reset-password ID [--json]              # prints the new password
    python manage.py backup create INSTANCE_ID NAME [--description D] [--wait [--timeout S]] [--json]
    python manage.py backup list|show [ID] [--json]
    python manage.py backup delete ID
    python manage.py quota show|set PROJECT [--instances N|default] [--backups N|default] [--json]
    python manage.py credentials add-user NAME --project P [--admin]     # prints the password
    python manage.py credentials add-token NAME --project P [--admin]    # prints the token
    python manage.py credentials list|remove [NAME]
    python manage.py system status [--json]   # what scripts/run started, workers answering, queues, instances
    python manage.py system stop              # stops what scripts/run started from this checkout

A client of the conductor like the REST API (workers/conductor/api.py): it parses arguments
and presents answers; every rule lives in the conductor. Only ``db`` opens the database;
``credentials`` edits the REST API's credentials file (workers/api/credentials.py).
"""

import argparse
import json
import sys
import time
import uuid
from typing import Callable

from dbaas import errors, settings, system, wire
from workers.api import credentials
from workers.api.credentials import CredentialError

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
                                       restore_from=args.restore_from, project_id=args.project,
                                       flavor_id=args.flavor, volume_size=args.size)
    password = view.get("password")  # in this answer only
    if args.wait:
        view = wait_for("instance", view["id"], conductor().instance_show, "status",
                        {"ACTIVE", "ERROR"}, args.timeout)
    if password:
        view["password"] = password
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
    view = conductor().instance_restart(args.id)
    if args.wait:
        view = wait_for("instance", args.id, conductor().instance_show, "status",
                        {"ACTIVE", "ERROR"}, args.timeout)
        return print_result(view, args.json, failure=instance_failure(view))
    if args.json:
        print_views([view], True, single=True)
    else:
        print(f"restarting instance {args.id}")
    return 0


def instance_reset_password(args) -> int:
    answer = conductor().instance_reset_password(args.id)
    print_views([{"id": args.id, "user": answer["user"], "password": answer["password"]}],
                args.json, single=True)
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
    return print_result(sized(view, args.json), args.json, failure)


def backup_show(args) -> int:
    print_views([sized(conductor().backup_show(args.id), args.json)], args.json, single=True)
    return 0


def backup_list(args) -> int:
    print_views([sized(view, args.json) for view in conductor().backup_list(instance_id=args.instance)],
                args.json, single=False, columns=BACKUP_COLUMNS)
    return 0


GIB = 1024 ** 3


def sized(backup: dict, as_json: bool) -> dict:
    """A backup's size in bytes (--json) or in human units: the conductor keeps Trove's
    size, GB of 2**30 bytes as a float."""
    if backup.get("size") is None:
        return backup
    size = round(backup["size"] * GIB)
    return {**backup, "size": size if as_json else human_bytes(size)}


def human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"


def backup_delete(args) -> int:
    conductor().backup_delete(args.id)
    print(f"deleting backup {args.id}")
    return 0


# --- quotas and the API's credentials ------------------------------------------------------

def quota_show(args) -> int:
    print_quota(conductor().quota_show(args.project), args.json)
    return 0


def quota_set(args) -> int:
    limits = {resource: getattr(args, resource) for resource in ("instances", "backups")
              if hasattr(args, resource)}
    print_quota(conductor().quota_update(args.project, **limits), args.json)
    return 0


def print_quota(quota: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(quota, indent=2))
        return
    for resource in ("instances", "backups"):
        entry = quota[resource]
        origin = "default" if entry["default"] else "own"
        print(f"{quota['project_id']}  {resource:<9}  {entry['in_use']} of {entry['limit']} ({origin})")


def quota_limit(text: str) -> int | None:
    if text == "default":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'default'")
    return int(text)


def credentials_add(args) -> int:
    kind = "user" if args.action == "add-user" else "token"
    print(credentials.add(settings.get().api_credentials_file, kind, args.name, args.project, args.admin))
    return 0


def credentials_list(args) -> int:
    for entry in credentials.entries(settings.get().api_credentials_file):
        print(f"{entry['kind']:<5}  {entry['name']:<24}  {entry['project']}{'  (admin)' if entry['admin'] else ''}")
    return 0


def credentials_remove(args) -> int:
    credentials.remove(settings.get().api_credentials_file, args.name)
    print(f"removed {args.name}")
    return 0


# --- the system as scripts/run runs it -----------------------------------------------------

# Seconds workers have to answer remote control (a live one answers in milliseconds), and a
# call to the conductor may take.
ANSWER_SECONDS, CALL_SECONDS = 1.0, 5.0


def system_status(args) -> int:
    from kombu.exceptions import KombuError

    from dbaas.celery import app
    from workers.conductor.api import ConductorAPI
    config = settings.get()
    found = {}
    for process in system.running(config):
        found.setdefault(process.name.partition(".")[0], process)
    status = {"var_dir": config.var_dir,
              "processes": {name: {"running": name in found, "pid": found[name].pid if name in found else None}
                            for name in system.procfile()},
              "workers": None, "queues": None, "instances": None, "errors": []}
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1)
            status["workers"] = system.workers(app, connection, ANSWER_SECONDS)
            status["queues"] = system.queue_depths(connection, [
                config.conductor_queue, config.conductor_control_queue, config.taskmanager_queue])
    except (OSError, KombuError) as exc:
        status["errors"].append(f"broker unreachable: {exc}")
    if status["workers"] and status["workers"]["conductor"]:
        try:
            status["instances"] = ConductorAPI(app, timeout=CALL_SECONDS).instance_counts()
        except errors.DbaasError as exc:
            status["errors"].append(f"instances not counted: {exc}")
    elif status["workers"] is not None:
        status["errors"].append("instances not counted: no conductor answers")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)
    return 0


def print_status(status: dict) -> None:
    up = any(process["running"] for process in status["processes"].values())
    print(f"system of {status['var_dir']}: {'running' if up else 'not running (scripts/run starts it)'}")
    for name, process in status["processes"].items():
        print(f"  {name:<12} {'running, pid %d' % process['pid'] if process['running'] else 'not running'}")
    if status["workers"] is not None:
        for role, names in status["workers"].items():
            if names or role != "other":
                print(f"{role}s answering: {', '.join(names) or 'none'}")
    if status["queues"] is not None:
        print("queues: " + ", ".join(f"{name} {'(none)' if depth is None else depth}"
                                     for name, depth in status["queues"].items()))
    if status["instances"] is not None:
        print("instances: " + (", ".join(f"{count} {state}" for state, count
                                         in sorted(status["instances"].items())) or "none"))
    for error in status["errors"]:
        print(error)


def system_stop(_args) -> int:
    if not system.stop():
        print(f"the system of {settings.get().var_dir} is not running")
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
            if isinstance(value, dict):  # connection, fault: key=value pairs, not Python's repr
                value = " ".join(f"{k}={'' if v is None else v}" for k, v in value.items())
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
    create.add_argument("--flavor", metavar="FLAVOR_ID", help="one of the REST API's (DBAAS_API_FLAVORS)")
    create.add_argument("--size", type=int, metavar="GB", help="the volume size the REST API shows")
    # By then the build-timeout sweep has decided: waiting longer cannot change the outcome.
    add_wait(create, "until ACTIVE (exit 0) or ERROR (exit 1)",
             config.usage_timeout + 2 * config.sweep_interval)
    command(instance, "list", instance_list, with_json=True)
    command(instance, "show", instance_show, with_id=True, with_json=True)
    command(instance, "delete", instance_delete, "stop and remove the instance", with_id=True)
    restart = command(instance, "restart", instance_restart, "restart the instance's datastore, "
                      "or start its guest agent again if it is gone", with_id=True, with_json=True)
    add_wait(restart, "until ACTIVE (exit 0) or ERROR (exit 1)",
             config.usage_timeout + 2 * config.sweep_interval)
    command(instance, "reset-password", instance_reset_password, "a new password for the "
            "administrator user (PostgreSQL), shown only now", with_id=True, with_json=True)
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

    quota = groups.add_parser("quota", help="a project's limits on instances and backups").add_subparsers(
        dest="action", required=True)
    command(quota, "show", quota_show, "limits and what is in use", with_json=True).add_argument("project")
    change = command(quota, "set", quota_set, "give the project limits of its own", with_json=True)
    change.add_argument("project")
    for resource in ("instances", "backups"):
        change.add_argument(f"--{resource}", type=quota_limit, default=argparse.SUPPRESS, metavar="N|default",
                            help=f"most {resource} the project may have; 'default': DBAAS_QUOTA_{resource.upper()}")

    callers = groups.add_parser("credentials", help="who may use the REST API, as which project "
                                "(DBAAS_API_CREDENTIALS_FILE)").add_subparsers(dest="action", required=True)
    for action, what in (("add-user", "an HTTP basic user; prints the password"),
                         ("add-token", "an X-Auth-Token; prints the token")):
        add = command(callers, action, credentials_add, f"add {what}")
        add.add_argument("name")
        add.add_argument("--project", required=True)
        add.add_argument("--admin", action="store_true", help="may act for every project")
    command(callers, "list", credentials_list, "users and tokens, without secrets")
    command(callers, "remove", credentials_remove, "remove a user or token").add_argument("name")

    whole = groups.add_parser("system", help="the system scripts/run started from this checkout").add_subparsers(
        dest="action", required=True)
    command(whole, "status", system_status, "its processes, the workers that answer (on any host), "
            "queue depths and instances by status", with_json=True)
    command(whole, "stop", system_stop, "stop it as Ctrl-C does: tasks in flight finish (scripts/stop)")
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
    except (errors.DbaasError, Failed, OSError, settings.SettingError, CredentialError, system.Refused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
