"""Command line of the guest agent: ``run`` is the agent itself (started by the compute
driver); the others let an operator debug a guest by hand:

    python -m workers.guestagent run --config FILE
    python -m workers.guestagent heartbeat --config FILE --status running
    python -m workers.guestagent update-backup --config FILE --backup-id ID --state COMPLETED
"""

import argparse
import logging
import sys

from dbaas import wire
from workers.guestagent import agent
from workers.guestagent import config as guest_config
from workers.guestagent.client import ConductorClient


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m workers.guestagent")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent until told to stop")
    run.add_argument("--config", required=True, help="the guest's configuration file")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

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
    if args.command == "run":
        logging.basicConfig(level=args.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        agent.run(config)
        return 0
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
