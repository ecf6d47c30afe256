"""Every setting of the control plane, declared once: name, environment variable, type,
default and help. The README's configuration table is generated from ``OPTIONS``
(``python manage.py settings``).

The defaults need no server: SQLite under ``var/`` and the embedded filesystem broker, so a
fresh machine runs the whole system. Production sets ``DBAAS_DATABASE_URL=postgresql://…``
(on the conductor only) and ``DBAAS_BROKER_URL=amqp://…``. Tests build a ``Settings`` from
a plain dict with ``load(env)``.
"""

import math
import os
import secrets
import sys
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import Callable

from dbaas.broker import broker_url_for

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Option:
    name: str
    env: str
    type: type
    # The default as the environment would spell it, or a function of the settings read
    # so far (var_dir first) when it depends on them.
    default: str | Callable[[dict], str]
    help: str
    # Which processes read it: the README says where each must be set.
    used_by: str = "all"
    # How the README shows a computed default.
    default_text: str | None = None
    # The only values allowed, for a str option.
    choices: tuple[str, ...] | None = None


OPTIONS: tuple[Option, ...] = (
    Option("var_dir", "DBAAS_VAR_DIR", str, str(PROJECT_ROOT / "var"),
           "state of the embedded setup: SQLite file, broker directory, instances, backups",
           default_text="`var/`"),
    Option("database_url", "DBAAS_DATABASE_URL", str,
           lambda s: f"sqlite:///{Path(s['var_dir']) / 'dbaas.sqlite3'}",
           "the control-plane database; production: `postgresql://user@host/db`",
           used_by="conductor, `manage.py db`", default_text="`sqlite:///var/dbaas.sqlite3`"),
    Option("broker_url", "DBAAS_BROKER_URL", str,
           lambda s: broker_url_for(Path(s["var_dir"]) / "broker"),
           "the message broker; production: `amqp://user:pass@host/vhost` (a `;`-separated "
           "list fails over between cluster nodes)", default_text="`dbaasfs://var/broker` (embedded)"),
    Option("conductor_queue", "DBAAS_CONDUCTOR_QUEUE", str, "trove-conductor",
           "the queue guests publish to (the public contract)"),
    Option("conductor_control_queue", "DBAAS_CONDUCTOR_CONTROL_QUEUE", str,
           "trove-conductor-control",
           "the queue of control-plane calls and casts to the conductor; every conductor "
           "consumes it besides the guests' queue, so calls never wait behind heartbeats"),
    Option("taskmanager_queue", "DBAAS_TASKMANAGER_QUEUE", str, "trove-taskmanager",
           "the taskmanager's queue"),
    Option("queue_type", "DBAAS_QUEUE_TYPE", str, "classic",
           "`classic` or `quorum`: RabbitMQ quorum queues (replicated over a cluster) for the "
           "conductor's, the taskmanager's and every guest's command queue; a message "
           "redelivered 10 times is dropped. Existing queues keep their type: switching "
           "needs them deleted (or a new vhost)", choices=("classic", "quorum")),
    Option("service_key", "DBAAS_SERVICE_KEY", str, "",
           "key the control-plane services sign with and guest keys are derived from; "
           "guests never hold it", used_by="control plane",
           default_text="generated once into `var/service.key`"),
    Option("call_timeout", "DBAAS_CALL_TIMEOUT", float, "10",
           "seconds a call to the conductor waits for its answer", used_by="clients"),
    Option("heartbeat_batch_size", "DBAAS_HEARTBEAT_BATCH_SIZE", int, "200",
           "heartbeats written per transaction", used_by="conductor"),
    Option("heartbeat_batch_interval", "DBAAS_HEARTBEAT_BATCH_INTERVAL", float, "0.02",
           "the longest a heartbeat waits for its batch (seconds)", used_by="conductor"),
    Option("max_message_bytes", "DBAAS_MAX_MESSAGE_BYTES", int, "65536",
           "larger messages are refused unread", used_by="workers"),
    Option("max_clock_skew", "DBAAS_MAX_CLOCK_SKEW", float, "300",
           "a guest's `sent` further ahead of the conductor's clock is refused: it would "
           "otherwise block every later message of that instance", used_by="conductor"),
    Option("db_retry_seconds", "DBAAS_DB_RETRY_SECONDS", float, "300",
           "how long a task retries while the database is away before handing the message "
           "back to the queue", used_by="conductor"),
    Option("credential_cache_seconds", "DBAAS_CREDENTIAL_CACHE_SECONDS", float, "60",
           "how long a conductor trusts what it read of an instance's credentials: a "
           "deleted instance's guest is refused at most this long after", used_by="conductor"),
    Option("guest_heartbeat_interval", "DBAAS_GUEST_HEARTBEAT_INTERVAL", float, "10",
           "how often guests beat (written into each guest's config)", used_by="taskmanager"),
    Option("agent_heartbeat_expiry", "DBAAS_AGENT_HEARTBEAT_EXPIRY", float, "45",
           "an ACTIVE instance silent this long turns ERROR, as does a restarting one "
           "whose guest reports nothing this long after the restart", used_by="conductor"),
    Option("sweep_interval", "DBAAS_SWEEP_INTERVAL", float, "10",
           "how often beat runs the timeout sweeps", used_by="beat"),
    Option("reconcile_interval", "DBAAS_RECONCILE_INTERVAL", float, "60",
           "how often beat has the taskmanager start a guest for every instance that should "
           "run and has none (it also does so as it starts)", used_by="beat"),
    Option("usage_timeout", "DBAAS_USAGE_TIMEOUT", float, "1800",
           "an instance still BUILD this long after creation turns ERROR", used_by="conductor"),
    Option("backup_timeout", "DBAAS_BACKUP_TIMEOUT", float, "3600",
           "a backup unfinished this long after creation turns FAILED", used_by="conductor"),
    Option("stop_timeout", "DBAAS_STOP_TIMEOUT", float, "30",
           "seconds `scripts/run` gives its processes to stop warmly (tasks in flight finish) "
           "on Ctrl-C, a closed terminal or `scripts/stop` before it kills them",
           used_by="`scripts/run`"),
    Option("broker_admin_url", "DBAAS_BROKER_ADMIN_URL", str, "",
           "RabbitMQ's management API with an administrator's credentials "
           "(`http://user:pass@host:15672`): the taskmanager creates and deletes each "
           "instance's own broker user through it; required with RabbitMQ",
           used_by="taskmanager", default_text="(none)"),
    Option("guest_max_connections", "DBAAS_GUEST_MAX_CONNECTIONS", int, "3",
           "connections a guest's broker user may hold at once", used_by="taskmanager"),
    Option("guest_max_channels", "DBAAS_GUEST_MAX_CHANNELS", int, "8",
           "channels a guest's broker user may hold at once", used_by="taskmanager"),
    Option("require_guest_user_id", "DBAAS_REQUIRE_GUEST_USER_ID", bool, "true",
           "on RabbitMQ, refuse a guest's message unless RabbitMQ vouched for its sender "
           "(the `user_id` property names that instance's broker user); turn off only to "
           "impersonate many guests over one connection (benchmarks)", used_by="conductor"),
    Option("metrics_address", "DBAAS_METRICS_ADDRESS", str, "127.0.0.1",
           "where each conductor serves Prometheus metrics (`/metrics`)", used_by="conductor"),
    Option("metrics_port", "DBAAS_METRICS_PORT", int, "9810",
           "the port of the conductor's metrics; a second conductor on the same host finds "
           "it taken and goes on without one (give each its own port)", used_by="conductor"),
    Option("compute_driver", "DBAAS_COMPUTE_DRIVER", str, "local",
           "how the taskmanager runs guests: `local`, one OS process per instance; `netns`, "
           "the same in a Linux network namespace of its own per instance that reaches only "
           "the broker (root, iproute2 and nftables; see \"Guests in network namespaces\")",
           used_by="taskmanager"),
    Option("netns_subnet", "DBAAS_NETNS_SUBNET", str, "10.253.0.0/16",
           "the private IPv4 range the `netns` driver owns: each instance takes a /30 of it "
           "(`.1` on the host's end of its veth pair, `.2` the guest's); a /30 overlapping "
           "any address or route of the host is skipped", used_by="taskmanager"),
    Option("guest_command", "DBAAS_GUEST_COMMAND", str,
           lambda s: f"{sys.executable} -m workers.guestagent run",
           "the guest agent the local driver starts (`--config FILE` is appended)",
           used_by="taskmanager", default_text="`<the taskmanager's python> -m workers.guestagent run`"),
    Option("quota_instances", "DBAAS_QUOTA_INSTANCES", int, "10",
           "instances a project may have unless `manage.py quota set` gave it a limit of its own",
           used_by="conductor"),
    Option("quota_backups", "DBAAS_QUOTA_BACKUPS", int, "50",
           "backups a project may have unless `manage.py quota set` gave it a limit of its own",
           used_by="conductor"),
    Option("max_volume_size", "DBAAS_MAX_VOLUME_SIZE", int, "10",
           "the largest volume (GB) an instance may ask for", used_by="conductor"),
    Option("api_host", "DBAAS_API_HOST", str, "127.0.0.1", "the address the REST API listens on",
           used_by="api"),
    Option("api_port", "DBAAS_API_PORT", int, "8779", "the REST API's port (Trove's)", used_by="api"),
    Option("api_credentials_file", "DBAAS_API_CREDENTIALS_FILE", str,
           lambda s: str(Path(s["var_dir"]) / "api-credentials.json"),
           "projects' users and tokens (see \"The REST API\"); re-read when it changes",
           used_by="api", default_text="`var/api-credentials.json`"),
    Option("api_credentials", "DBAAS_API_CREDENTIALS", str, "",
           "the same as JSON text; when set, the file is not read", used_by="api",
           default_text="unset"),
    Option("api_max_body_bytes", "DBAAS_API_MAX_BODY_BYTES", int, "65536",
           "larger request bodies are refused (413)", used_by="api"),
    Option("api_page_size", "DBAAS_API_PAGE_SIZE", int, "100",
           "the most items one page of a list holds; a larger `limit` is lowered to it",
           used_by="api"),
    Option("api_flavors", "DBAAS_API_FLAVORS", str,
           "1:small:1024:1:5,2:medium:4096:2:20,3:large:8192:4:40",
           "the flavors offered: comma-separated `ID:NAME:RAM_MB:VCPUS:DISK_GB`", used_by="api"),
)

Settings = make_dataclass("Settings", [(option.name, option.type) for option in OPTIONS],
                          frozen=True)


class SettingError(ValueError):
    """A setting's value cannot be used."""


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(option: Option, text: str):
    if option.type is str:
        if option.choices and text not in option.choices:
            raise SettingError(f"{option.env}={text!r} is not one of {', '.join(option.choices)}")
        return text
    if option.type is bool:
        if text.lower() not in BOOLEANS:
            raise SettingError(f"{option.env}={text!r} is not true or false")
        return BOOLEANS[text.lower()]
    try:
        value = option.type(text)
    except ValueError:
        value = None
    # Every number here is a size, a count or a duration: zero, negatives, inf and nan
    # would only turn into a hang or a busy loop somewhere far from the cause.
    if value is None or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if option.type is int else "a positive number"
        raise SettingError(f"{option.env}={text!r} is not {kind}")
    return value


def _service_key(var_dir: Path) -> str:
    """The key generated once into var/ for the embedded setup."""
    path = var_dir / "service.key"
    if not path.exists():
        # Several processes may start at once on a fresh var/: each writes a whole key
        # aside and links it into place; exactly one link wins, nobody reads half a key.
        var_dir.mkdir(parents=True, exist_ok=True)
        candidate = var_dir / f".service.key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        try:
            os.link(candidate, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(candidate)
    key = path.read_text().strip()
    if not key:
        raise SettingError(f"{path} is empty: remove it or set DBAAS_SERVICE_KEY")
    return key


def load(env: dict | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    values: dict = {}
    for option in OPTIONS:
        text = env.get(option.env)
        if text in (None, ""):
            text = option.default(values) if callable(option.default) else option.default
        values[option.name] = _convert(option, text)
    var_dir = Path(values["var_dir"]).resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    values["var_dir"] = str(var_dir)
    if not values["service_key"]:
        values["service_key"] = _service_key(var_dir)
    return Settings(**values)


def markdown_table() -> str:
    """The README's configuration table."""
    rows = ["| variable | default | used by | meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        default = option.default_text or f"`{option.default}`"
        rows.append(f"| `{option.env}` | {default} | {option.used_by} | {option.help} |")
    return "\n".join(rows)


_current: Settings | None = None


def get() -> Settings:
    """The process-wide settings, read from the environment once."""
    global _current
    if _current is None:
        _current = load()
    return _current
