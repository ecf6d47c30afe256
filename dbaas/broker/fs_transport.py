"""kombu's ``filesystem://`` transport, made safe for processes sharing one directory.

URL: ``dbaasfs:///absolute/path/to/broker-dir`` (see ``dbaas.broker.broker_url_for``).
The directory is created if missing::

    messages/<queue>/<stamp>_<id>.<queue>.msg   ready, oldest stamp first
    messages/<queue>/.<same name>.….tmp         being written
    unacked/<owner>.<message name>        claimed by a consumer, not yet acked
    owners/<pid>-<token>.lock             locked by a consuming (or declaring) process for its whole life
    users/<owner>.<queue>                 that process declared that auto-delete queue
    control/<exchange>.exchange           kombu's binding tables (shared, as in kombu)
    control/<queue>.autodelete            the queue is auto-delete (touched when declared)
    corrupt/                              files that did not decode, set aside

What differs from kombu's transport, and why:

* Publishing writes a temp file and renames it into place, so a consumer never
  reads half a message (kombu issue #1551).
* A directory per queue: a poll lists only its own queue, so 20,000 messages waiting in
  one queue do not make every poll of every other queue list them all.
* Consuming renames the message into ``unacked/`` first: exactly one consumer
  wins the rename, and the message stays on disk until acked. A requeue or a
  restore-on-close renames it back; kombu would publish a copy instead.
* The kernel releases a process's POSIX lock on its owner file when the process
  dies, SIGKILL included. Whoever can then take the lock puts that owner's
  unacked messages back: at-least-once delivery, like RabbitMQ. A lock rather
  than a bare pid, so a recycled pid (containers restart at the same pids) or
  a zombie cannot keep messages hostage.
* Messages of auto-delete queues (Celery events, pidbox, replies) older than
  ``transient_message_ttl`` are swept: their consumer is gone, nobody reads them.
* An auto-delete queue is deleted with its bindings and messages once every process that
  declared it has died and it was last declared longer than ``transient_message_ttl``
  ago. kombu's virtual transport never deletes one: the event queue of every Flower or
  `celery events` that ever ran stayed bound and got a copy of every event. Not as soon
  as its last consumer goes, as RabbitMQ does: a live process may consume it again
  without binding it again (kombu remembers its bindings per process).

Single host, POSIX only: rename atomicity and record locks are what make it
correct, and they do not hold across network filesystem clients. Messages are
not fsynced: they survive any process crash, not a power loss.

Transport options: ``polling_interval`` (0.1 s), ``housekeeping_interval``
(recovery and sweep, 5 s), ``transient_message_ttl`` (300 s).
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import re
import threading
from collections import defaultdict, deque
from contextlib import suppress
from pathlib import Path
from queue import Empty
from time import monotonic, time_ns
from urllib.parse import unquote, urlsplit
from uuid import uuid4

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.json import dumps, loads

from dbaas.broker import SCHEME
from dbaas.files import write_atomically

logger = logging.getLogger(__name__)

MESSAGE_NAME = re.compile(r"(?P<stamp>\d{20})_[0-9a-f]{32}\.(?P<queue>.+)\.msg")
# dbaas.files.write_atomically's temporary name for a message being written.
TEMP_NAME = re.compile(r"\.(?P<name>.+\.msg)\.\d+\.[0-9a-f]+\.tmp")
AUTODELETE = ".autodelete"

_owners_guard = threading.Lock()
_owners: dict[Path, tuple[int, str, int]] = {}  # owners dir -> (pid, owner, locked fd)


def broker_dir(url: str) -> Path:
    parts = urlsplit(url)
    if parts.scheme != SCHEME or parts.netloc or parts.query or not parts.path.startswith("/"):
        raise ValueError(f"expected {SCHEME}:///absolute/path/to/broker-dir, got {url!r}")
    # One spelling per directory: the process owner below is keyed by it.
    return Path(os.path.realpath(unquote(parts.path)))


def process_owner(owners_dir: Path) -> str:
    """This process's owner id, its lock file created and locked on first use.

    One per process, not per connection: POSIX locks belong to the process, so a
    process's second lock file would look dead to itself, and closing it would unlock.
    """
    with _owners_guard:
        pid, owner, fd = _owners.get(owners_dir, (None, "", None))
        if pid == os.getpid():
            return owner
        if fd is not None:
            os.close(fd)  # inherited through fork: the lock stays with the parent
        owner = f"{os.getpid()}-{uuid4().hex[:8]}"
        staging = owners_dir / f".{owner}.tmp"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        # Published under its real name only once locked: never mistaken for a dead owner's.
        os.rename(staging, owners_dir / f"{owner}.lock")
        _owners[owners_dir] = (os.getpid(), owner, fd)
        return owner


def _own_owner(owners_dir: Path) -> str | None:
    pid, owner, _ = _owners.get(owners_dir, (None, "", None))
    return owner if pid == os.getpid() else None


def _lock_if_dead(lock_file: Path) -> int | None:
    """A locked descriptor of *lock_file* if its process is gone, else None."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:  # just recovered by another process
        return None
    try:
        # A shared lock needs only read access (consumers may run as other users); it is
        # refused while the owner lives. Two recoverers may both get it: every rename
        # they race on succeeds for one of them only.
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _checked(queue: str) -> str:
    if "/" in queue or "\0" in queue or queue in ("", ".", ".."):  # queue names become paths
        raise ChannelError(f"invalid queue name {queue!r}")
    return queue


def _valid_payload(payload) -> bool:
    """Whether a message file holds what kombu will read without failing: it may have
    been written by hand, or truncated by a power loss."""
    if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
        return False
    properties = payload["properties"]
    if not isinstance(properties.get("delivery_tag"), (str, int)) or \
            not isinstance(properties.get("delivery_info", {}), dict) or \
            not isinstance(payload.get("headers") or {}, dict) or not isinstance(payload.get("body", ""), str):
        return False
    if properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(payload.get("body", ""), validate=True)
        except ValueError:
            return False
    elif properties.get("body_encoding") is not None:
        return False
    return True


class Channel(filesystem.Channel):
    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        # queue -> names listed but not tried yet: listing costs more than a claim
        self._backlogs = defaultdict(deque)
        # Opening a channel is when a restarted consumer must see what its crashed predecessor held.
        self.connection.housekeep_if_due(self)

    @property
    def control_folder(self):
        return self.connection.control_dir

    def _put(self, queue, payload, **kwargs):
        name = f"{time_ns():020d}_{uuid4().hex}.{_checked(queue)}.msg"
        write_atomically(self.connection.queue_dir(queue) / name, dumps(payload))

    def _get(self, queue):
        self.connection.housekeep_if_due(self)
        for name in self._candidates(queue):
            payload = self._claim(queue, name)
            if payload is not None:
                return payload
        raise Empty()

    def _candidates(self, queue):
        """Ready message names, oldest first: the cached listing, then one fresh listing."""
        backlog = self._backlogs[queue]
        while backlog:
            yield backlog.popleft()
        backlog.extend(self._ready_files(queue))
        while backlog:
            yield backlog.popleft()

    def _ready_files(self, queue):
        try:
            names = os.listdir(self.connection.ready_dir / _checked(queue))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def _claim(self, queue, name):
        """The payload of message *name*, now ours; None if another consumer took it first."""
        transport = self.connection
        owned = f"{process_owner(transport.owners_dir)}.{name}"
        try:
            os.rename(transport.ready_dir / queue / name, transport.unacked_dir / owned)
        except FileNotFoundError:
            return None
        try:
            payload = loads((transport.unacked_dir / owned).read_bytes())
            if not _valid_payload(payload):
                raise ValueError("not a message kombu can read")
            delivery_tag = payload["properties"]["delivery_tag"]
        except (ValueError, RecursionError, KeyError, TypeError):
            # A power loss (no fsync) can truncate a file, and a file written by hand may
            # hold anything: set it aside so it cannot stop consumers.
            logger.error("undecodable message %s moved to %s", name, transport.corrupt_dir)
            transport.corrupt_dir.mkdir(exist_ok=True)
            os.rename(transport.unacked_dir / owned, transport.corrupt_dir / name)
            return None
        transport.unacked_by_tag[delivery_tag] = owned
        return payload

    def _discard(self, delivery_tag):
        """Delete an acked or dropped message; nothing if it was requeued already."""
        owned = self.connection.unacked_by_tag.pop(delivery_tag, None)
        if owned is not None:
            os.unlink(self.connection.unacked_dir / owned)

    def _restore(self, message):
        """Requeue by renaming the claimed file back (kombu publishes a copy instead)."""
        owned = self.connection.unacked_by_tag.pop(message.delivery_tag, None)
        if owned is not None:
            self.connection.put_back(owned)

    def basic_ack(self, delivery_tag, multiple=False):
        super().basic_ack(delivery_tag, multiple)
        self._discard(delivery_tag)

    def basic_reject(self, delivery_tag, requeue=False):
        # With requeue, kombu calls _restore, which renames the file back: nothing left to discard.
        super().basic_reject(delivery_tag, requeue)
        self._discard(delivery_tag)

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        if no_ack:  # nobody will ack: the file goes when the message is handed over
            callback = self._discarding_on_delivery(callback)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def _discarding_on_delivery(self, callback):
        def discard_then_deliver(message):
            self._discard(message.delivery_tag)
            return callback(message)

        return discard_then_deliver

    def basic_get(self, queue, no_ack=False, **kwargs):
        message = super().basic_get(queue, no_ack, **kwargs)
        if message is not None and no_ack:
            self._discard(message.delivery_tag)
        return message

    def _new_queue(self, queue, auto_delete=False, **kwargs):
        if auto_delete:  # tells every process's sweep that these messages are disposable
            (self.control_folder / f"{_checked(queue)}{AUTODELETE}").touch()
            transport = self.connection
            (transport.users_dir / f"{process_owner(transport.owners_dir)}.{queue}").touch()

    def _delete(self, queue, *args, **kwargs):
        super()._delete(queue, *args, **kwargs)
        (self.control_folder / f"{queue}{AUTODELETE}").unlink(missing_ok=True)

    def _size(self, queue):
        return len(self._ready_files(queue))

    def _delete_unused(self, queue):
        """Delete an auto-delete queue nobody uses: its bindings in every exchange's
        table, then its messages and its marker."""
        for table in self.control_folder.glob("*.exchange"):
            exchange = table.name[: -len(".exchange")]
            for binding in self.get_table(exchange):
                if binding.queue == queue:
                    self._delete(queue, exchange, binding.routing_key, binding.pattern)
        self._purge(queue)
        (self.control_folder / f"{queue}{AUTODELETE}").unlink(missing_ok=True)

    def _purge(self, queue):
        purged = 0
        for name in self._ready_files(queue):
            with suppress(FileNotFoundError):
                os.unlink(self.connection.ready_dir / queue / name)
                purged += 1
        return purged


class Transport(filesystem.Transport):
    Channel = Channel
    driver_type = driver_name = SCHEME
    # The URL is a path: kombu's host/virtual-host split would mangle it.
    can_parse_url = True
    # An idle poll is one listdir per queue; kombu's 1 s would make every Celery control reply slow.
    polling_interval = 0.1

    # Exchanges and bindings are declared per process but used by all its connections
    # (kombu's global_state), kept apart per broker directory.
    _states: dict[Path, virtual.BrokerState] = {}

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        self.root = broker_dir(client.hostname)
        self.state = self._states.setdefault(self.root, virtual.BrokerState())
        self.ready_dir = self.root / "messages"
        self.unacked_dir = self.root / "unacked"
        self.owners_dir = self.root / "owners"
        self.control_dir = self.root / "control"
        self.users_dir = self.root / "users"
        self.corrupt_dir = self.root / "corrupt"
        for folder in (self.ready_dir, self.unacked_dir, self.owners_dir, self.control_dir, self.users_dir):
            folder.mkdir(parents=True, exist_ok=True)
        options = client.transport_options
        self.housekeeping_interval = options.get("housekeeping_interval", 5.0)
        self.transient_message_ttl = options.get("transient_message_ttl", 300.0)
        # delivery tag -> claimed file, for all channels: kombu may requeue through another channel
        self.unacked_by_tag = {}
        self._next_housekeeping = 0.0
        self._queue_dirs: set[str] = set()
        # Messages of the earlier layout (one directory for all queues) go to their queue's.
        for name in os.listdir(self.ready_dir):
            if (match := MESSAGE_NAME.fullmatch(name)) is not None:
                with suppress(FileNotFoundError):
                    os.rename(self.ready_dir / name, self.queue_dir(match["queue"]) / name)

    def queue_dir(self, queue: str) -> Path:
        """messages/<queue>, made on first use."""
        directory = self.ready_dir / _checked(queue)
        if queue not in self._queue_dirs:
            directory.mkdir(exist_ok=True)
            self._queue_dirs.add(queue)
        return directory

    def put_back(self, owned: str) -> bool:
        """Rename a claimed message back into its queue; False if it is gone already."""
        name = owned.partition(".")[2]
        match = MESSAGE_NAME.fullmatch(name)
        if match is None:
            return False
        with suppress(FileNotFoundError):
            os.rename(self.unacked_dir / owned, self.queue_dir(match["queue"]) / name)
            return True
        return False

    def as_uri(self, uri, include_password=False, mask="**"):
        return uri

    def housekeep_if_due(self, channel):
        now = monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + self.housekeeping_interval
            self.recover_orphans()
            self.sweep()
            self.delete_unused(channel)

    def recover_orphans(self):
        """Put the unacked messages of dead processes back into their queues."""
        own = _own_owner(self.owners_dir)
        dead = {}
        for lock_name in os.listdir(self.owners_dir):
            owner, ext = os.path.splitext(lock_name)
            if ext == ".lock" and owner != own:
                fd = _lock_if_dead(self.owners_dir / lock_name)
                if fd is not None:
                    dead[owner] = fd
        if not dead:
            return
        # Listed only now that the owners are known dead: they cannot claim more.
        recovered = 0
        for owned in os.listdir(self.unacked_dir):
            if owned.partition(".")[0] in dead:
                recovered += self.put_back(owned)
        for owner, fd in dead.items():
            with suppress(FileNotFoundError):
                os.unlink(self.owners_dir / f"{owner}.lock")
            os.close(fd)
        if recovered:
            logger.warning("requeued %d unacked message(s) of dead consumer(s) %s", recovered, ", ".join(dead))

    def sweep(self):
        """Delete stale messages of auto-delete queues (their consumer is gone), and
        stale temp files (their producer died mid-write). Other queues are never swept."""
        disposable = {n[: -len(AUTODELETE)] for n in os.listdir(self.control_dir) if n.endswith(AUTODELETE)}
        cutoff = time_ns() - int(self.transient_message_ttl * 1e9)
        for queue in os.listdir(self.ready_dir):
            with suppress(FileNotFoundError, NotADirectoryError):
                for name in os.listdir(self.ready_dir / queue):
                    temp = TEMP_NAME.fullmatch(name)
                    match = MESSAGE_NAME.fullmatch(temp["name"] if temp else name)
                    if match and int(match["stamp"]) < cutoff and (temp or queue in disposable):
                        with suppress(FileNotFoundError):
                            os.unlink(self.ready_dir / queue / name)

    def delete_unused(self, channel):
        """Delete the auto-delete queues that no live process declared and that were last
        declared before the cutoff."""
        # Records first: a record's owner lock exists before the record does.
        records = os.listdir(self.users_dir)
        live = {name[: -len(".lock")] for name in os.listdir(self.owners_dir) if name.endswith(".lock")}
        used = set()
        for record in records:
            owner, _, queue = record.partition(".")
            if owner in live:
                used.add(queue)
            else:  # its process died: recover_orphans removed its lock
                (self.users_dir / record).unlink(missing_ok=True)
        cutoff = time_ns() - int(self.transient_message_ttl * 1e9)
        for name in os.listdir(self.control_dir):
            queue = name[: -len(AUTODELETE)]
            if not name.endswith(AUTODELETE) or queue in used:
                continue
            with suppress(FileNotFoundError):
                if (self.control_dir / name).stat().st_mtime_ns < cutoff:
                    channel._delete_unused(queue)
