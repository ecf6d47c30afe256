"""Operator command line of the control plane.

    python manage.py db upgrade
    python manage.py instance create NAME [--datastore sqlite|postgresql] [--json]
    python manage.py instance list [--json]
    python manage.py instance show ID [--json]
"""

import argparse
import json
import os
import sys

from sqlalchemy.exc import SQLAlchemyError

from dbaas import db, instances, migrations, settings
from workers.guestagent import config as guest_config


def db_command(args) -> int:
    if args.action == "upgrade":
        migrations.upgrade()
    else:
        migrations.current()
    return 0


def guest_config_path(instance_id: str) -> str:
    return os.path.join(settings.get().var_dir, "instances", instance_id, "guest.json")


def instance_create(args) -> int:
    config = settings.get()
    # The guest config is written before the instance commits: an instance whose
    # secret nobody received must not exist.
    with db.session_scope() as session:
        instance, secret = instances.create_instance(session, args.name, datastore=args.datastore)
        view = instances.instance_view(instance)
        path = args.config_out or guest_config_path(view["id"])
        guest_config.write(path, guest_config.GuestConfig(
            instance_id=view["id"], secret=secret, broker_url=config.broker_url,
            conductor_queue=config.conductor_queue, datastore=view["datastore"],
            data_dir=os.path.join(os.path.dirname(path), "data"),
            backup_root=os.path.join(config.var_dir, "backups"),
            heartbeat_interval=config.guest_heartbeat_interval))
    view["guest_config"] = path
    print_views([view], args.json, single=True)
    return 0


def instance_show(args) -> int:
    with db.session_scope() as session:
        view = instances.instance_view(instances.get_instance(session, args.id))
    print_views([view], args.json, single=True)
    return 0


def instance_list(args) -> int:
    with db.session_scope() as session:
        views = [instances.instance_view(i) for i in instances.list_instances(session)]
    print_views(views, args.json, single=False)
    return 0


TABLE_COLUMNS = ("id", "name", "datastore", "status", "operating_status", "last_heartbeat")


def print_views(views: list[dict], as_json: bool, single: bool) -> None:
    if as_json:
        print(json.dumps(views[0] if single else views, indent=2))
    elif single:
        for key, value in views[0].items():
            print(f"{key:>20}  {'' if value is None else value}")
    else:
        rows = [TABLE_COLUMNS] + [tuple(str(v.get(c) or "") for c in TABLE_COLUMNS) for v in views]
        widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python manage.py")
    groups = parser.add_subparsers(dest="group", required=True)

    database = groups.add_parser("db", help="database schema")
    database.add_argument("action", choices=("upgrade", "current"))
    database.set_defaults(handler=db_command)

    instance = groups.add_parser("instance", help="database instances")
    actions = instance.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="record an instance and write its guest config")
    create.add_argument("name")
    create.add_argument("--datastore", default="sqlite")
    create.add_argument("--config-out", help="where to write the guest config file")
    create.set_defaults(handler=instance_create)
    show = actions.add_parser("show")
    show.add_argument("id")
    show.set_defaults(handler=instance_show)
    listing = actions.add_parser("list")
    listing.set_defaults(handler=instance_list)
    for sub in (create, show, listing):
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return args.handler(args)
    except (instances.InvalidRequest, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        print(f"error: database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}\n"
              f"(is the schema up to date? run: python manage.py db upgrade)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
