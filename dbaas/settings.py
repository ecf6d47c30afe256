"""Every setting of the control plane: one environment variable each, typed, with a default.

The defaults need no server: SQLite under ``var/`` and the embedded filesystem broker, so a
fresh machine runs the whole system. Production sets ``DBAAS_DATABASE_URL=postgresql://…``
and ``DBAAS_BROKER_URL=amqp://…``. Tests build a ``Settings`` from a plain dict.
"""

import os
import secrets
from dataclasses import dataclass, fields
from pathlib import Path

from dbaas.broker import broker_url_for

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    var_dir: str
    database_url: str
    broker_url: str
    conductor_queue: str
    taskmanager_queue: str
    # Shared secret of the control-plane services (taskmanager, API, CLI). Guests never
    # hold it; the conductor accepts CRUD tasks only when signed with it.
    service_key: str
    # Heartbeats written per transaction and the longest a heartbeat waits for its batch.
    heartbeat_batch_size: int
    heartbeat_batch_interval: float
    # Anything larger is rejected before it is decoded.
    max_message_bytes: int
    # A guest's `sent` further ahead of the conductor's clock than this is refused: it
    # would otherwise block every later message of that instance.
    max_clock_skew: float
    # How long a task keeps retrying while the database is unreachable before the
    # message goes back to the queue.
    db_retry_seconds: float
    credential_cache_seconds: float
    # Guests beat every guest_heartbeat_interval; beat sweeps every sweep_interval; an
    # ACTIVE instance silent for agent_heartbeat_expiry turns ERROR: with the defaults a
    # dead guest shows within about a minute.
    guest_heartbeat_interval: float
    sweep_interval: float
    agent_heartbeat_expiry: float
    usage_timeout: float
    backup_timeout: float


def _env_default(name: str, default: str, env: dict) -> str:
    value = env.get(name)
    return value if value not in (None, "") else default


def _service_key(var_dir: Path, env: dict) -> str:
    """The configured key, or one generated once into var/ for the embedded setup."""
    configured = env.get("DBAAS_SERVICE_KEY")
    if configured:
        return configured
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
        raise RuntimeError(f"{path} is empty: remove it or set DBAAS_SERVICE_KEY")
    return key


def load(env: dict | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    var_dir = Path(_env_default("DBAAS_VAR_DIR", str(PROJECT_ROOT / "var"), env)).resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    raw = {
        "var_dir": str(var_dir),
        "database_url": _env_default("DBAAS_DATABASE_URL", f"sqlite:///{var_dir / 'dbaas.sqlite3'}", env),
        "broker_url": _env_default("DBAAS_BROKER_URL", broker_url_for(str(var_dir / "broker")), env),
        "conductor_queue": _env_default("DBAAS_CONDUCTOR_QUEUE", "trove-conductor", env),
        "taskmanager_queue": _env_default("DBAAS_TASKMANAGER_QUEUE", "trove-taskmanager", env),
        "heartbeat_batch_size": _env_default("DBAAS_HEARTBEAT_BATCH_SIZE", "200", env),
        "heartbeat_batch_interval": _env_default("DBAAS_HEARTBEAT_BATCH_INTERVAL", "0.02", env),
        "max_message_bytes": _env_default("DBAAS_MAX_MESSAGE_BYTES", "65536", env),
        "max_clock_skew": _env_default("DBAAS_MAX_CLOCK_SKEW", "300", env),
        "db_retry_seconds": _env_default("DBAAS_DB_RETRY_SECONDS", "300", env),
        "credential_cache_seconds": _env_default("DBAAS_CREDENTIAL_CACHE_SECONDS", "60", env),
        "guest_heartbeat_interval": _env_default("DBAAS_GUEST_HEARTBEAT_INTERVAL", "10", env),
        "sweep_interval": _env_default("DBAAS_SWEEP_INTERVAL", "10", env),
        "agent_heartbeat_expiry": _env_default("DBAAS_AGENT_HEARTBEAT_EXPIRY", "45", env),
        "usage_timeout": _env_default("DBAAS_USAGE_TIMEOUT", "1800", env),
        "backup_timeout": _env_default("DBAAS_BACKUP_TIMEOUT", "3600", env),
    }
    typed = {}
    for field in fields(Settings):
        if field.name == "service_key":
            continue
        typed[field.name] = field.type(raw[field.name]) if field.type in (int, float) else raw[field.name]
    return Settings(service_key=_service_key(var_dir, env), **typed)


_current: Settings | None = None


def get() -> Settings:
    """The process-wide settings, read from the environment once."""
    global _current
    if _current is None:
        _current = load()
    return _current
