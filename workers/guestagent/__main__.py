"""Command line of the guest agent, e.g. for an operator debugging a guest by hand:

    python -m workers.guestagent heartbeat --config FILE --status running
    python -m workers.guestagent update-backup --config FILE --backup-id ID --state COMPLETED
"""

import argparse
import sys

from dbaas import wire
from workers.guestagent import config as guest_config
from workers.guestagent.client import ConductorClient


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m workers.guestagent")
    commands = parser.add_subparsers(dest="command", required=True)

    beat = commands.add_parser("heartbeat", help="send one heartbeat")
    beat.add_argument("--config", required=True, help="the guest's configuration file")
    beat.add_argument("--status", choices=sorted(wire.SERVICE_STATUSES),
                      help="datastore status to report (omit for a liveness-only heartbeat)")

    backup = commands.add_parser("update-backup", help="report a backup's progress")
    backup.add_argument("--config", required=True, help="the guest's configuration file")
    backup.add_argument("--backup-id", required=True)
    backup.add_argument("--state", choices=sorted(wire.BACKUP_STATE_RANK))
    backup.add_argument("--size", type=float)
    backup.add_argument("--checksum")
    backup.add_argument("--location")
    backup.add_argument("--backup-type")
    backup.add_argument("--fail-reason")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = guest_config.load(args.config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"cannot read guest config {args.config}: {exc}", file=sys.stderr)
        return 2
    client = ConductorClient(config)
    try:
        if args.command == "heartbeat":
            client.heartbeat(service_status=args.status)
        else:
            fields = {name: getattr(args, name) for name in
                      ("state", "size", "checksum", "location", "backup_type", "fail_reason")
                      if getattr(args, name) is not None}
            client.update_backup(args.backup_id, **fields)
    finally:
        client.close()
    print(f"sent {args.command} for instance {config.instance_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
