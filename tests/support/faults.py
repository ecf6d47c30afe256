"""What fault tests build on: a control plane on private servers (tests/support/private_*),
vhosts made through a private node's management API, an in-process client of the
conductor, and guests that send exactly as the guest agent does and record every send.

Nothing here touches the shared RabbitMQ or PostgreSQL.
"""

import importlib.util
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from urllib.parse import quote

import requests
from celery import Celery
from kombu import Connection, Producer
from sqlalchemy import select

from dbaas import db, migrations, settings, wire
from dbaas.models import Backup, Instance, Watermark
from dbaas.queues import queue
from tests.support import guests as support_guests
from tests.support.services import ROOT, Worker, project_env, wait_until
from tests.support.stack import SERVICE_KEY, configure, guest_secret
from workers.conductor.api import ConductorAPI
from workers.guestagent.agent import Reporter
from workers.guestagent.client import ConductorClient
from workers.guestagent.config import GuestConfig
from workers.taskmanager.broker_users import BrokerUsers
from workers.taskmanager.compute.local import LocalDriver, instances_root

# A database URL that leads nowhere: what every process but the conductor is given.
NO_DATABASE = "postgresql://nobody@127.0.0.1:1/no-such-database"
# Statuses a simulated guest reports (not the sticky "restart required").
STATUSES = ("running", "healthy", "crashed", "paused", "blocked", "building")


# --- brokers -----------------------------------------------------------------------------

class Vhost:
    """A vhost on private RabbitMQ node(s), made and dropped through the management API
    (a rabbitmqctl call costs seconds); ``url`` lists every node (kombu fails over)."""

    def __init__(self, nodes: list, name: str | None = None):
        self.nodes = nodes
        self.name = name or f"dbaas-{uuid.uuid4().hex[:8]}"

    def url_of(self, node) -> str:
        return f"amqp://guest:guest@127.0.0.1:{node.port}/{quote(self.name, safe='')}"

    @property
    def url(self) -> str:
        return ";".join(self.url_of(node) for node in self.nodes)

    def admin_url(self, node=None) -> str:
        node = node or self.nodes[0]
        return f"http://guest:guest@127.0.0.1:{node.management_port}"

    def api(self, method: str, path: str, node=None, **kwargs) -> requests.Response:
        """The management API of ``node`` (or the first running one)."""
        node = node or next(n for n in self.nodes if n.running)
        response = requests.request(method, f"http://127.0.0.1:{node.management_port}/api/{path}",
                                    auth=("guest", "guest"), timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def create(self) -> "Vhost":
        self.api("PUT", f"vhosts/{quote(self.name, safe='')}")
        self.api("PUT", f"permissions/{quote(self.name, safe='')}/guest",
                 json={"configure": ".*", "write": ".*", "read": ".*"})
        return self

    def queues(self, node=None) -> list[dict]:
        return self.api("GET", f"queues/{quote(self.name, safe='')}", node=node).json()


class Publisher(support_guests.Publisher):
    """tests.support.guests.Publisher (fast, no confirms: for backlogs) on a queue declared
    as DBAAS_QUEUE_TYPE says."""

    def __init__(self, broker_url: str, queue_name: str | None = None):
        config = settings.get()
        self.queue = queue(queue_name or config.conductor_queue, config.queue_type)
        self.connection = Connection(broker_url, transport_options={"confirm_publish": False})
        channel = self.connection.channel()
        self.queue(channel).declare()
        self.producer = Producer(channel, exchange=self.queue.exchange, routing_key=self.queue.routing_key)

    def update_backup(self, instance_id: str, secret: str, backup_id: str, sent: float, **fields) -> None:
        self.signed(wire.UPDATE_BACKUP_TASK, [instance_id, backup_id, sent], secret, instance_id,
                    kwargs=fields)


# --- the control plane -----------------------------------------------------------------

def client_app() -> Celery:
    """A Celery app configured from celeryconfig.py as it reads the settings now (the
    module itself was evaluated once, with whatever settings the first importer had)."""
    spec = importlib.util.spec_from_file_location(f"celeryconfig_{uuid.uuid4().hex[:8]}",
                                                  ROOT / "celeryconfig.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = Celery("fault-client", set_as_current=False)
    app.config_from_object(module)
    return app


class System:
    """A control plane on private servers: this process configured as the conductor (it
    arranges and checks rows directly), the worker processes a test starts, a client of
    the conductor in this process, and every guest the taskmanager provisions.
    ``close()`` ends all of it, also after a failure."""

    def __init__(self, monkeypatch, tmp_path: Path, broker_url: str, database_url: str,
                 admin_url: str | None = None, **env):
        self.tmp = tmp_path
        extra = {"DBAAS_BROKER_ADMIN_URL": admin_url} if admin_url else {}
        self.env = project_env(DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_DATABASE_URL=database_url,
                               DBAAS_BROKER_URL=broker_url, DBAAS_SERVICE_KEY=SERVICE_KEY,
                               DBAAS_QUEUE_TYPE="quorum", **extra, **env)
        configure(monkeypatch, **{k: v for k, v in self.env.items() if k.startswith("DBAAS_")})
        migrations.upgrade()
        self.workers: list[Worker] = []
        self._app: Celery | None = None
        self._api: ConductorAPI | None = None

    def _worker(self, name: str, queue: str, concurrency: int, env: dict) -> Worker:
        worker = Worker(env, self.tmp / f"{name}-{uuid.uuid4().hex[:6]}.log", queue=queue,
                        concurrency=concurrency, name=f"{name}-{uuid.uuid4().hex[:6]}@%h")
        self.workers.append(worker)
        return worker

    def conductor(self, name: str = "conductor", concurrency: int = 1, **env) -> Worker:
        return self._worker(name, "trove-conductor", concurrency, {**self.env, **env})

    def taskmanager(self, name: str = "taskmanager", concurrency: int = 2, **env) -> Worker:
        return self._worker(name, "trove-taskmanager", concurrency,
                            {**self.env, "DBAAS_DATABASE_URL": NO_DATABASE, **env})

    @staticmethod
    def start(*workers: Worker) -> None:
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(Worker.start, workers))

    @property
    def api(self) -> ConductorAPI:
        if self._api is None:
            self._app = client_app()
            self._api = ConductorAPI(self._app)
        return self._api

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.log()[-4000:]}" for w in self.workers
                         if w.log_path.exists())

    def close(self) -> None:
        for worker in self.workers:  # thrown away: no need to wait for a graceful stop
            worker.kill()
            worker.stop()
        root = Path(instances_root())
        for directory in root.iterdir() if root.exists() else ():
            LocalDriver(stop_timeout=2).destroy(directory.name)
        if self._app is not None:
            self._app.close()
        if db._engine is not None:
            db._engine.dispose()

    # --- provisioning through the conductor, as the API does it

    def create_instance(self, name: str, datastore: str = "sqlite") -> str:
        instance_id = str(uuid.uuid4())
        self.api.instance_create(instance_id, name, datastore=datastore)
        return instance_id

    def wait_active(self, instance_ids: list[str], timeout: float = 120) -> None:
        def active():
            return all(self.api.instance_show(i)["status"] == "ACTIVE" for i in instance_ids)
        try:
            wait_until(active, timeout=timeout, interval=0.3, message="the instances ACTIVE")
        except AssertionError:
            raise AssertionError(f"not ACTIVE: {[self.api.instance_show(i) for i in instance_ids]}\n"
                                 f"{guest_logs()}\n{self.logs()}") from None


def guest_logs() -> str:
    root = Path(instances_root())
    return "\n".join(f"--- guest {p.parent.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(root.glob("*/guest.log")))


def guest_pid(instance_id: str) -> int | None:
    try:
        return int((Path(instances_root()) / instance_id / "guest.pid").read_text().split()[0])
    except (OSError, ValueError):
        return None


# --- rows --------------------------------------------------------------------------------

def make_backups(instance_id: str, count: int) -> list[str]:
    """``count`` NEW backups of the instance, recorded directly."""
    def work(session):
        made = [Backup(instance_id=instance_id, tenant_id="default", name=f"b{n}") for n in range(count)]
        session.add_all(made)
        session.flush()
        return [b.id for b in made]
    return db.run_transaction(work)


def watermarks(kind: str) -> dict[str, float]:
    with db.session_scope() as session:
        return dict(session.execute(select(Watermark.key, Watermark.sent).where(Watermark.kind == kind)).all())


def backups_by_id(ids=None) -> dict[str, Backup]:
    with db.session_scope() as session:
        statement = select(Backup)
        if ids is not None:
            statement = statement.where(Backup.id.in_(list(ids)))
        rows = session.scalars(statement).all()
        session.expunge_all()
        return {b.id: b for b in rows}


def instances_by_id(ids) -> dict[str, Instance]:
    with db.session_scope() as session:
        rows = session.scalars(select(Instance).where(Instance.id.in_(list(ids)))).all()
        session.expunge_all()
        return {i.id: i for i in rows}


def epoch(moment) -> float:
    """A naive UTC datetime of the database as epoch seconds."""
    return moment.replace(tzinfo=timezone.utc).timestamp()


# --- guests that record what they sent ------------------------------------------------------

@dataclass
class Send:
    task: str
    key: str          # the ordering key: the instance (heartbeat) or the backup
    sent: float
    fields: dict
    began: float
    ended: float
    ok: bool


class RecordingClient(ConductorClient):
    """The guest agent's client (publisher confirms), recording each send: ``ok`` when it
    returned (the broker confirmed it), not when it raised (the guest was told it failed)."""

    def __init__(self, config: GuestConfig):
        super().__init__(config)
        self.sends: list[Send] = []

    def send(self, task_name: str, args: list, kwargs: dict | None = None) -> None:
        if task_name == wire.HEARTBEAT_TASK:
            key, sent, fields = args[0], args[2], dict(args[1])
        else:
            key, sent, fields = args[1], args[2], dict(kwargs or {})
        began = time.time()
        try:
            super().send(task_name, args, kwargs)
        except Exception:
            self.sends.append(Send(task_name, key, sent, fields, began, time.time(), False))
            raise
        self.sends.append(Send(task_name, key, sent, fields, began, time.time(), True))


@dataclass
class SimulatedGuest:
    """One instance's sending exactly as its agent does it — workers.guestagent.agent's
    Reporter (heartbeats dropped when they fail, backup reports kept in an outbox until
    confirmed) over the agent's ConductorClient — on the instance's own broker user."""

    instance_id: str
    broker_url: str
    outbox: Path
    backups: list[str] = field(default_factory=list)

    def __post_init__(self):
        config = GuestConfig(instance_id=self.instance_id, secret=guest_secret(self.instance_id),
                             broker_url=self.broker_url, conductor_queue=settings.get().conductor_queue)
        self.client = RecordingClient(config)
        self.reporter = Reporter(self.client, self.outbox)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @classmethod
    def provisioned(cls, instance_id: str, broker_url: str, admin_url: str, outbox: Path,
                    backups: int = 0) -> "SimulatedGuest":
        """With a broker user of its own made by the taskmanager's code, and ``backups``
        NEW backups to report on."""
        url = BrokerUsers(admin_url=admin_url, broker_url=broker_url).ensure(instance_id, 1)
        return cls(instance_id, url, outbox, make_backups(instance_id, backups) if backups else [])

    def step(self, n: int) -> None:
        """A heartbeat, then (while backups are left) one backup finished in one report."""
        self.reporter.heartbeat(random.choice(STATUSES))
        if n < len(self.backups):
            self.reporter.update_backup(self.backups[n], state="COMPLETED", size=n / 1024,
                                        checksum=f"{n:064x}", location=f"file:///backups/{self.backups[n]}",
                                        backup_type="test")

    def run(self, stop: threading.Event, pause: float) -> None:
        try:
            n = 0
            while not stop.is_set():
                self.step(n)
                n += 1
                stop.wait(pause)
        except BaseException as exc:  # noqa: BLE001  reported by the test
            self.error = exc

    def start(self, stop: threading.Event, pause: float = 0.05) -> "SimulatedGuest":
        self.thread = threading.Thread(target=self.run, args=(stop, pause), daemon=True)
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive(), "a simulated guest hangs"
        if self.error:
            raise self.error

    def flush(self) -> None:
        """What the agent does next: a heartbeat, which also delivers the outbox."""
        self.reporter.heartbeat("running")

    def waiting(self) -> int:
        return len(list(self.outbox.glob("*.json")))

    def confirmed(self, task: str) -> list[Send]:
        return [s for s in self.client.sends if s.ok and s.task == task]

    def failed(self) -> list[Send]:
        return [s for s in self.client.sends if not s.ok]

    def close(self) -> None:
        self.reporter.close()


def check_guests(guests: list[SimulatedGuest]) -> dict:
    """Every confirmed send against the database: each backup report confirmed must be
    applied (one report per backup, so each is its own key), and each instance's heartbeat
    watermark and status must be its newest confirmed heartbeat's."""
    reports = [s for g in guests for s in g.confirmed(wire.UPDATE_BACKUP_TASK)]
    newest_report = {}
    for s in reports:  # a report re-sent from the outbox is the same report
        newest_report[s.key] = s
    rows = backups_by_id(newest_report)
    marks = watermarks("backup")
    lost = [s.key for s in newest_report.values()
            if not (rows[s.key].state == s.fields["state"] and marks.get(s.key) == s.sent)]
    beats = {g.instance_id: max(g.confirmed(wire.HEARTBEAT_TASK), key=lambda s: s.sent, default=None)
             for g in guests}
    beat_marks = watermarks("heartbeat")
    statuses = {i: r.service_status for i, r in instances_by_id(beats).items()}
    not_newest = [i for i, s in beats.items() if s is None or beat_marks.get(i) != s.sent
                  or statuses[i] != s.fields.get("service_status")]
    return {
        "reports": len(newest_report), "applied": len(newest_report) - len(lost), "lost": lost,
        "heartbeats": sum(len(g.confirmed(wire.HEARTBEAT_TASK)) for g in guests),
        "failed": sum(len(g.failed()) for g in guests), "not_newest": not_newest,
    }
