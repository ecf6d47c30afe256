"""The guest agent's runtime: carries out its instance's commands and sends heartbeats.

    python -m workers.guestagent run --config FILE

The main thread consumes the instance's command queue and carries out one command at a
time, acknowledging it afterwards: an agent killed mid-command gets it again when it
starts next. A thread of its own sends ``conductor.heartbeat`` every
``heartbeat_interval`` seconds, so a long backup does not silence it.

Statuses reported (each heartbeat, and at once on every change of phase):

- nothing (a liveness-only heartbeat) before a prepare;
- ``building`` while preparing; ``failed to spawn`` once a prepare failed (until one succeeds);
- ``restarting`` while a restart command stops and starts the datastore;
- ``running`` when the datastore answers a probe, ``crashed`` when it should be up and
  does not — a real probe each heartbeat, never the agent's belief;
- ``shutdown`` after a clean stop (the ``stop`` command, SIGTERM or SIGINT), then it exits.

An agent started on a prepared data_dir starts the datastore (adopting a server its
killed predecessor left running) and reports as above: the instance recovers. Only one
agent runs per data_dir (``pidlock``): a second one exits at once.

An agent whose instance was deleted stops by itself: on RabbitMQ its broker user is
deleted, which closes its connection, and after ``REFUSALS_BEFORE_STOP`` refused logins in
a row it stops as after ``stop``; on the embedded broker, which has no users, the
taskmanager sends it ``stop`` before removing its queue.
"""

import contextlib
import hashlib
import inspect
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from amqp.exceptions import AccessRefused
from kombu import Connection
from kombu.mixins import ConsumerMixin

from dbaas import intake, signing
from dbaas.storage import BACKUP_NAME, LocalStorage
from workers.guestagent import pidlock
from workers.guestagent.client import ConductorClient, broker_heartbeat
from workers.guestagent.commands import (COMMAND_MAX_BYTES, CommandRefused, command_queue,
                                         verify_command)
from workers.guestagent.config import GuestConfig
from workers.guestagent.datastores import datastore_for
from workers.guestagent.datastores.base import write_json

log = logging.getLogger("guestagent")

GB = 1024 ** 3
SCRATCH_SUFFIX = ".scratch"
# Logins the broker refuses in a row (about one a second) before the agent concludes that
# its credentials were revoked — its instance deleted — and stops.
REFUSALS_BEFORE_STOP = 5
# The administrator's password at creation; reset_password moves to later generations.
FIRST_PASSWORD_GENERATION = 1
# What a heartbeat reports in each phase without probing (None: liveness only); in
# phase "up" it probes the datastore instead.
PHASE_STATUS = {
    "new": None,
    "preparing": "building",
    "failed": "failed to spawn",
    "restarting": "restarting",
    "stopped": "shutdown",
}


class Reporter:
    """Signed messages to the conductor, one at a time, each ``sent`` later than the one
    before: the conductor discards a message not newer than the last it applied for the
    same instance or backup, and time.time() can return the same value twice.

    A heartbeat that cannot be sent is dropped (the next one says the same, newer). A
    backup report is written to the outbox (``data_dir/outbox``) before it is sent and
    removed only once the broker confirmed it: reports that could not be delivered — the
    broker away, the link cut — are sent, in order, when it can be reached again, also
    after the agent restarts.

    The thread reporting on a backup never waits for another thread's send, nor tries
    again while earlier reports still wait (the broker did not take those): with the
    broker unreachable a send takes seconds, and the backup goes on meanwhile. Its report
    waits in the outbox, and the next heartbeat that gets through delivers it.
    """

    def __init__(self, client: ConductorClient, outbox: Path):
        self.client = client
        self.outbox = outbox
        self.outbox.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # held while sending: one send at a time
        self._stamp_lock = threading.RLock()  # held while stamping ``sent`` and writing the outbox
        self._pending = threading.Event()  # reports written while another thread was sending
        # Never below a report still waiting: it must stay older than what follows it.
        self._last_sent = max((float(p.name.split("-", 1)[0]) for p in self._waiting()), default=0.0)

    def _sent(self) -> float:
        with self._stamp_lock:
            self._last_sent = max(time.time(), self._last_sent + 1e-6)
            return self._last_sent

    def _waiting(self) -> list[Path]:
        return sorted(self.outbox.glob("*.json"))

    def heartbeat(self, status: str | None) -> None:
        with self._lock:
            try:
                self.client.heartbeat(service_status=status, sent=self._sent())
            except Exception:  # the broker may be away: the next heartbeat tries again
                log.exception("heartbeat not sent")
                return
            self._deliver_waiting()
        self._deliver_pending()

    def update_backup(self, backup_id: str, **fields) -> None:
        with self._stamp_lock:
            earlier = bool(self._waiting())
            sent = self._sent()
            write_json(self.outbox / f"{sent:020.6f}-{backup_id}.json",
                       {"backup_id": backup_id, "sent": sent, "fields": fields})
        self._pending.set()
        if not earlier:
            self._deliver_pending()

    def _deliver_pending(self) -> None:
        """Deliver the outbox now unless another thread is sending: that one does it when
        its send is done (it finds ``_pending`` set), so no report waits for a heartbeat."""
        while self._pending.is_set() and self._lock.acquire(blocking=False):
            try:
                self._pending.clear()
                self._deliver_waiting()
            finally:
                self._lock.release()

    def _deliver_waiting(self) -> None:
        for path in self._waiting():
            report = json.loads(path.read_text())
            try:
                self.client.update_backup(report["backup_id"], sent=report["sent"], **report["fields"])
            except Exception:
                log.warning("backup report for %s kept for later: the broker did not take it",
                            report["backup_id"], exc_info=True)
                return
            path.unlink()

    def close(self) -> None:
        self.client.close()


class BrokerGivenUp(Exception):
    """Asked to stop while waiting for the broker to come back."""


class CredentialsRefused(Exception):
    """The broker refused this guest's login REFUSALS_BEFORE_STOP times in a row."""


class Agent(ConsumerMixin):
    def __init__(self, config: GuestConfig):
        self.config = config
        # Heartbeats: the consumer loop sends them while it waits for commands.
        self.connection = Connection(config.broker_url, heartbeat=broker_heartbeat(config))
        self.datastore = datastore_for(config.datastore, config.data_dir)
        self.storage = LocalStorage(config.backup_root)
        self.reporter = Reporter(ConductorClient(config), self.datastore.data_dir / "outbox")
        self.phase = "new"
        # Held from a probe to its report, and around each change of phase, so that a
        # heartbeat that probed before a change is never sent after the change's report.
        self._phase_lock = threading.Lock()
        self._done = threading.Event()
        self.refusals = 0
        self.handlers = {"prepare": self.prepare, "restart": self.restart,
                         "backup": self.backup, "stop": self.stop,
                         "reset_password": self.reset_password}

    # --- lifetime

    def serve(self) -> None:
        """Run until a stop command or request_stop; stop the datastore on the way out."""
        for leftover in self.datastore.data_dir.glob(f".*{SCRATCH_SUFFIX}"):
            leftover.unlink()  # of a killed predecessor
        if self.datastore.prepared():
            self.start_datastore()
        else:
            self.enter("new")
        beats = threading.Thread(target=self._beat_until_done, name="heartbeat", daemon=True)
        beats.start()
        try:
            self.run()
        except (BrokerGivenUp, CredentialsRefused):
            pass
        finally:
            self._done.set()
            beats.join(timeout=30)
            self.shutdown_datastore()
            self.reporter.close()
        log.info("agent for instance %s stopped", self.config.instance_id)

    def request_stop(self, signum, _frame) -> None:
        """Signal handler: finish the command at hand, then stop."""
        log.info("signal %s: stopping", signal.Signals(signum).name)
        self.should_stop = True

    def on_connection_error(self, exc, interval) -> None:
        if self.should_stop:
            raise BrokerGivenUp() from exc
        super().on_connection_error(exc, interval)

    def consume(self, *args, **kwargs):
        # A refused login is not a connection error kombu retries: it surfaces here, and
        # kombu's run() tries again once a second, forever.
        try:
            yield from super().consume(*args, **kwargs)
        except AccessRefused:
            self.refusals += 1
            if self.refusals >= REFUSALS_BEFORE_STOP:
                log.warning("the broker refused this guest's login %d times in a row: its "
                            "credentials were revoked (the instance deleted?); stopping",
                            self.refusals)
                raise CredentialsRefused() from None
            raise

    def on_connection_revived(self) -> None:
        self.refusals = 0

    # --- heartbeats

    def enter(self, phase: str) -> None:
        with self._phase_lock:
            self.phase = phase
            self._report_status()

    def _beat_until_done(self) -> None:
        while not self._done.wait(self.config.heartbeat_interval):
            try:
                with self._phase_lock:
                    self._report_status()
            except Exception:  # this thread must outlive any one failure: its silence means "dead"
                log.exception("heartbeat failed")

    def _report_status(self) -> None:
        if self.phase == "up":
            status = "running" if self.datastore.probe() else "crashed"
        else:
            status = PHASE_STATUS[self.phase]
        self.reporter.heartbeat(status)

    # --- commands

    def get_consumers(self, Consumer, channel):
        # on_message: the raw message, decoded by our own checks (kombu's decoder would
        # raise on a malformed body right through this loop).
        return [Consumer(queues=[command_queue(self.config.instance_id, declare=False)],
                         prefetch_count=1, on_message=self.on_message,
                         on_decode_error=lambda message, _exc: self.on_message(message))]

    def on_message(self, message) -> None:
        """Carry out one command, then acknowledge it, whatever the outcome: a refused or
        failed command redelivered would only be refused or fail again."""
        try:
            try:
                if message.errors:  # what kombu could not do while building it
                    raise intake.Refused(f"undecodable message: {message.errors[0][1]}"[:200])
                body = intake.decode_json(message.body, message.content_type,
                                          message.content_encoding, COMMAND_MAX_BYTES)
            except intake.Refused as exc:
                raise CommandRefused(str(exc)) from None
            command, args = verify_command(self.config.secret, body, message.headers)
            handler = self.handlers[command]
            try:
                inspect.signature(handler).bind(**args)
            except TypeError as exc:
                raise CommandRefused(f"bad arguments for {command}: {exc}") from None
            log.info("command %s %s", command, args)
            started = time.monotonic()
            handler(**args)
            log.info("command %s done in %.2fs", command, time.monotonic() - started)
        except CommandRefused as exc:
            log.warning("refused a command: %s", exc)
        except Exception:
            log.exception("command failed")
        message.ack()

    def prepare(self, port=None, restore_location=None, host=None) -> None:
        if port is not None and not (type(port) is int and 0 < port < 65536):
            raise CommandRefused(f"port {port!r} is not a TCP port")
        if host is not None and not (isinstance(host, str) and is_ipv4(host)):
            raise CommandRefused(f"host {str(host)[:64]!r} is not an IPv4 address")
        if restore_location is not None and not isinstance(restore_location, str):
            raise CommandRefused("restore_location must be a string")
        if self.datastore.prepared():
            log.info("already prepared (a redelivered prepare): only starting it")
            self.start_datastore()
            return
        self.enter("preparing")
        started = time.monotonic()
        try:
            with self.scratch_file("restore") as scratch:
                restore_from = None
                if restore_location:
                    self.storage.get(restore_location, str(scratch))
                    restore_from = str(scratch)
                self.datastore.prepare(restore_from=restore_from, port=port, host=host,
                                       admin_password=self.admin_password(FIRST_PASSWORD_GENERATION))
        except Exception:
            log.exception("prepare failed")
            self.enter("failed")
            return
        log.info("prepared in %.1fs: %s", time.monotonic() - started, self.datastore.connection_info())
        self.enter("up")

    def restart(self) -> None:
        if not self.datastore.prepared():
            raise CommandRefused("nothing to restart: the datastore is not prepared")
        self.enter("restarting")
        try:
            self.datastore.stop()
        finally:
            self.start_datastore()

    def stop(self) -> None:
        self.shutdown_datastore()
        self.should_stop = True

    def reset_password(self, generation) -> None:
        if not (type(generation) is int and 0 < generation < 2 ** 31):
            raise CommandRefused(f"generation {str(generation)[:32]!r} is not a positive integer")
        if not self.datastore.admin_user:
            raise CommandRefused(f"a {self.config.datastore} datastore has no users")
        if not self.datastore.prepared():
            raise CommandRefused("the datastore is not prepared")
        self.datastore.set_admin_password(self.admin_password(generation))

    def admin_password(self, generation: int) -> str:
        return signing.admin_password(self.config.secret, generation)

    def start_datastore(self) -> None:
        try:
            self.datastore.start()
        except Exception:  # reported as crashed by the probe
            log.exception("datastore did not start")
        self.enter("up")

    def shutdown_datastore(self) -> None:
        if self.phase != "up":
            return
        try:
            self.datastore.stop()
        except Exception:  # not a clean stop: no "shutdown" report
            log.exception("datastore did not stop")
            return
        self.enter("stopped")

    # --- backups

    def backup(self, backup_id) -> None:
        """Dump, store, report. Sizes are reported in GB (a float), as Trove does."""
        if not (isinstance(backup_id, str) and BACKUP_NAME.fullmatch(backup_id)):
            raise CommandRefused(f"backup_id {str(backup_id)[:64]!r} is not a plain name")
        marker = self.datastore.data_dir / "backups" / f"{backup_id}.json"
        if marker.exists():
            log.info("backup %s completed before (a redelivered command): reporting it again",
                     backup_id)
        else:
            self.reporter.update_backup(backup_id, state="BUILDING")
            try:
                result = self._make_backup(backup_id)
            except Exception as exc:
                log.exception("backup %s failed", backup_id)
                self.reporter.update_backup(backup_id, state="FAILED",
                                            fail_reason=f"{type(exc).__name__}: {exc}"[:2000])
                return
            marker.parent.mkdir(exist_ok=True)
            write_json(marker, result)
        self.reporter.update_backup(backup_id, **json.loads(marker.read_text()))

    def _make_backup(self, backup_id: str) -> dict:
        if not self.datastore.prepared():
            raise RuntimeError("the datastore is not prepared")
        started = time.monotonic()
        with self.scratch_file(f"backup-{backup_id}") as dump:
            self.datastore.backup(str(dump))
            size = dump.stat().st_size
            with open(dump, "rb") as content:
                checksum = hashlib.file_digest(content, "sha256").hexdigest()
            self.reporter.update_backup(backup_id, state="SAVING")
            location = self.storage.put(backup_id, str(dump))
        log.info("backup %s: %d bytes in %.2fs at %s", backup_id, size,
                 time.monotonic() - started, location)
        return {"state": "COMPLETED", "size": size / GB, "checksum": checksum,
                "location": location, "backup_type": self.datastore.backup_type}

    @contextlib.contextmanager
    def scratch_file(self, name: str):
        """A path in data_dir (room for a whole database), removed afterwards. Named per
        process: a dump of a killed predecessor may still be writing its own."""
        self.datastore.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.datastore.data_dir / f".{name}.{os.getpid()}{SCRATCH_SUFFIX}"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


def is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def run(config: GuestConfig) -> None:
    if not (config.data_dir and config.backup_root):
        raise SystemExit("the guest config must name data_dir and backup_root")
    try:
        lock = pidlock.hold(config.data_dir)
    except pidlock.AlreadyRunning as exc:
        raise SystemExit(f"instance {config.instance_id}: {exc}") from None
    try:
        agent = Agent(config)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, agent.request_stop)
        log.info("agent for instance %s (%s) starting, pid %d", config.instance_id,
                 config.datastore, os.getpid())
        agent.serve()
    finally:
        pidlock.release(config.data_dir, lock)
