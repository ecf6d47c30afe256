"""The default compute driver: each instance's guest agent is an OS process on this host.

``var/instances/<id>/`` holds everything of one instance: ``guest.json`` (the config the
taskmanager hands over), the guest's data directory ``data/``, ``guest.log``,
``guest.pid`` and ``endpoint``; destroy removes it whole. The agent records itself in its
data (``data/agent.pid``, with its start time, under a per-instance lock: see
workers/guestagent/pidlock.py), so the driver finds it however it was started — by hand,
or by an earlier taskmanager — and never starts a second one.

The guest runs detached — a session of its own, stdin from /dev/null, output to guest.log —
so it outlives the taskmanager worker that started it: restarting the taskmanager must not
take databases down. It gets none of the control plane's environment (the service key may
be in it). Same host and same user, though: this driver isolates nothing; containers or
VMs would. A redelivered request is recognised through ``var/instances``, so every
taskmanager using this driver must run on the one host that holds it.

The guest is a child of the worker process that started it until it exits: a thread per
guest waits for it, so a guest that ends (stopped, killed, crashed) does not stay a zombie.
"""

import dataclasses
import fcntl
import glob
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable, NamedTuple

from dbaas import settings
from dbaas.files import write_atomically
from dbaas.settings import PROJECT_ROOT
from workers.guestagent.api import GuestConfig, running_agent, write_config
from workers.taskmanager.compute.base import ComputeDriver, InstanceDeleted, SpawnError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PID_FILE, LOG_FILE, ENDPOINT_FILE, CONFIG_FILE = "guest.pid", "guest.log", "endpoint", "guest.json"
DATA_DIR = "data"
# The only variables a guest inherits: the control plane's own may hold secrets.
GUEST_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
KILL_WAIT = 10.0
# Below the kernel's ephemeral range (by default from 32768), from which every outgoing
# connection takes its local port: a port chosen there may be gone before the datastore
# binds it.
DATASTORE_PORTS = range(20000, 32768)


class InstanceGone(InstanceDeleted):
    """The instance's directory does not exist (deleted, or its guest config written elsewhere)."""


def instances_root() -> str:
    return os.path.join(settings.get().var_dir, "instances")


def instance_dir(instance_id: str) -> str:
    # The id becomes a path that destroy removes whole: only a canonical UUID may, never "../x".
    if not isinstance(instance_id, str) or str(uuid.UUID(instance_id)) != instance_id:
        raise ValueError(f"not an instance id: {instance_id!r}")
    return os.path.join(instances_root(), instance_id)


def tombstones_root() -> str:
    return os.path.join(settings.get().var_dir, "deleted-instances")


def _tombstone(directory: str) -> str:
    """The file that says the instance of ``directory`` was deleted (see destroy)."""
    return os.path.join(tombstones_root(), os.path.basename(directory))


def config_path(instance_id: str) -> str:
    return os.path.join(instance_dir(instance_id), CONFIG_FILE)


class LocalDriver(ComputeDriver):
    def __init__(self, command: list[str] | None = None, startup_grace: float = 1.0,
                 stop_timeout: float = 10.0):
        # DBAAS_GUEST_COMMAND, e.g. a guest agent installed in another virtualenv.
        self.command = command or shlex.split(settings.get().guest_command)
        # A guest that cannot start at all (bad command, unreadable config) dies at once:
        # waiting this long turns that into a fault now rather than a build timeout later.
        self.startup_grace = startup_grace
        self.stop_timeout = stop_timeout

    def spawn(self, instance_id: str, config: GuestConfig) -> None:
        directory = instance_dir(instance_id)
        os.makedirs(directory, exist_ok=True)
        with _locked(directory):
            if self._running(directory):
                log.info("guest of %s already runs; not starting another", instance_id)
                return
            path = os.path.join(directory, CONFIG_FILE)
            write_config(path, dataclasses.replace(config, data_dir=os.path.join(directory, DATA_DIR)))
            log_path = os.path.join(directory, LOG_FILE)
            with open(log_path, "ab") as output:
                try:
                    process = subprocess.Popen(
                        self._launch_command(instance_id, path), cwd=directory, env=_guest_env(),
                        stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                        start_new_session=True)
                except OSError as exc:
                    raise SpawnError(f"cannot start the guest agent: {exc}") from None
            # Not reaped yet, so its /proc entry exists even if it already exited.
            write_atomically(os.path.join(directory, PID_FILE), f"{process.pid} {_stat(process.pid).started}")
            try:
                status = process.wait(timeout=self.startup_grace)
            except subprocess.TimeoutExpired:
                log.info("started guest of %s as pid %d", instance_id, process.pid)
                threading.Thread(target=process.wait, name=f"reap-guest-{process.pid}", daemon=True).start()
                return
            raise SpawnError(f"the guest agent exited at once with status {status}: {_tail(log_path)}")

    def is_deleted(self, instance_id: str) -> bool:
        return os.path.exists(_tombstone(instance_dir(instance_id)))

    def is_running(self, instance_id: str) -> bool:
        return self._running(instance_dir(instance_id))

    def holds(self, instance_id: str) -> bool:
        return os.path.exists(config_path(instance_id)) and not self.is_deleted(instance_id)

    def held(self) -> set[str]:
        return {os.path.basename(os.path.dirname(path)) for path in
                glob.glob(os.path.join(instances_root(), "*", CONFIG_FILE))} - self._deleted()

    def data_dir(self, instance_id: str) -> str:
        return os.path.join(instance_dir(instance_id), DATA_DIR)

    def destroy(self, instance_id: str) -> None:
        """Also leaves a tombstone, first of all: a create of the instance that is under way
        or comes later (redelivered, or run beside the delete by another worker process)
        finds it under the instance's lock and starts nothing (InstanceDeleted), instead
        of a guest nobody would ever stop."""
        directory = instance_dir(instance_id)
        os.makedirs(tombstones_root(), exist_ok=True)
        os.close(os.open(_tombstone(directory), os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            with _locked(directory, deleting=True):
                self._stop_agent(directory)
                self._stop_guest(directory)
                self._stop_leftovers(directory)
                self._release(instance_id)
                shutil.rmtree(directory)
        except InstanceGone:
            return
        log.info("destroyed instance %s", instance_id)

    def allocate_endpoint(self, instance_id: str) -> tuple[str, int]:
        directory = instance_dir(instance_id)
        os.makedirs(directory, exist_ok=True)  # called before spawn, which makes it too
        with _locked(directory):
            path = os.path.join(directory, ENDPOINT_FILE)
            if not os.path.exists(path):
                # One choice at a time on this host, and never a port another instance was
                # given: its datastore may just be stopped (restarting, crashed).
                with _locked(instances_root()):
                    write_atomically(path, str(_free_port(_ports_given())))
            with open(path) as recorded:
                return HOST, int(recorded.read())

    def _deleted(self) -> set[str]:
        root = tombstones_root()
        return set(os.listdir(root)) if os.path.isdir(root) else set()

    def _launch_command(self, instance_id: str, config_file: str) -> list[str]:
        """The command that starts the guest. Called under the instance's lock, just before
        it runs: a driver that must set something up for the guest first does it here."""
        return [*self.command, "--config", config_file]

    def _release(self, instance_id: str) -> None:
        """Whatever a driver set up for the instance besides its directory. Called under the
        instance's lock once its processes are stopped, before the directory goes."""

    def _running(self, directory: str) -> bool:
        """The agent recorded in the data, or the process this driver started (an agent
        still starting has not recorded itself yet)."""
        if running_agent(os.path.join(directory, DATA_DIR)) is not None:
            return True
        leader = _leader(directory)
        if leader is None:
            return False
        stat = _stat(leader[0])
        return stat is not None and stat.started == leader[1] and stat.state not in "ZX"

    def _stop_agent(self, directory: str) -> None:
        """The agent recorded in the instance's data, wherever it runs from: one started
        by hand is in nobody's process group of ours."""
        pid = running_agent(os.path.join(directory, DATA_DIR))
        stat = _stat(pid) if pid else None
        if stat is None:
            return

        def find() -> list[int]:
            now = _stat(pid)
            return [pid] if now and now.started == stat.started and now.state not in "ZX" else []
        _stop(find, lambda sig: _kill(pid, sig), self.stop_timeout)

    def _stop_guest(self, directory: str) -> None:
        leader = _leader(directory)
        if leader is None:
            return
        pgid, started = leader
        stat = _stat(pgid)
        if stat is not None and stat.started != started:
            return  # the pid was reused: the guest and its whole group are long gone
        # A process group outlives its leader while any member runs, and its id cannot be
        # reused meanwhile: signalling it reaches the guest's leftovers and nobody else.
        _stop(lambda: _processes(lambda pid, stat: stat.pgrp == pgid),
              lambda sig: _kill(pgid, sig, group=True), self.stop_timeout)
        try:
            os.waitpid(pgid, os.WNOHANG)  # no zombie, if this process started it
        except ChildProcessError:
            pass

    def _stop_leftovers(self, directory: str) -> None:
        """Whatever still runs in the instance's directory is the instance's: the postmaster
        (pg_ctl puts it in a session of its own, and it works in its data directory) or
        anything else the guest detached. Processes with a terminal are spared: that is an
        operator's shell that cd'ed there."""
        def find():
            return _processes(lambda pid, stat: stat.tty == 0 and _inside(pid, directory))
        _stop(find, lambda sig: [_kill(pid, sig) for pid in find()], self.stop_timeout)


@contextmanager
def _locked(directory: str, deleting: bool = False):
    """One spawn, allocate_endpoint or destroy of an instance at a time, across every
    worker process on this host (two deliveries of one create may run side by side).
    Anything but a destroy (``deleting``) of a deleted instance raises InstanceDeleted."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise InstanceGone(f"no instance directory {directory}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.isdir(directory):
            raise InstanceGone(f"instance directory {directory} was removed")
        if not deleting and os.path.exists(_tombstone(directory)):
            raise InstanceDeleted(f"instance {os.path.basename(directory)} was deleted")
        yield
    finally:
        os.close(fd)


def _ports_given() -> set[int]:
    given = set()
    for path in glob.glob(os.path.join(instances_root(), "*", ENDPOINT_FILE)):
        with open(path) as recorded:
            given.add(int(recorded.read()))
    return given


def _free_port(excluded: set[int]) -> int:
    """A port nobody listens on now. Not reserved: should another program take it before
    the datastore binds it, the guest reports the datastore failed."""
    for port in random.sample(DATASTORE_PORTS, 100):
        if port in excluded:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        return port
    raise SpawnError(f"no free port for the datastore in {DATASTORE_PORTS}")


class _Stat(NamedTuple):
    state: str
    pgrp: int
    tty: int
    started: int  # clock ticks after boot: with the pid, identifies one process for good


def _stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat") as source:
            text = source.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: fields start after the last ")".
    fields = text.rpartition(")")[2].split()
    return _Stat(fields[0], int(fields[2]), int(fields[4]), int(fields[19]))


def _processes(where: Callable[[int, _Stat], bool]) -> list[int]:
    """Live (not zombie) processes matching ``where``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) and stat.state not in "ZX" \
                and where(int(name), stat):
            found.append(int(name))
    return found


def _inside(pid: int, directory: str) -> bool:
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd == directory or cwd.startswith(directory + os.sep)


def _kill(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass


def _stop(find: Callable[[], list[int]], send: Callable[[int], object], grace: float) -> None:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL: bounded either way."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
        if not find():
            return
        send(sig)
        deadline = time.monotonic() + wait
        while find() and time.monotonic() < deadline:
            time.sleep(0.05)
    if survivors := find():
        raise RuntimeError(f"processes {survivors} survived SIGKILL")


def _leader(directory: str) -> tuple[int, int] | None:
    """(pid, start time) of the guest recorded in the pid file."""
    try:
        with open(os.path.join(directory, PID_FILE)) as source:
            pid, started = map(int, source.read().split())
    except (FileNotFoundError, ValueError):
        return None
    return pid, started


def _guest_env() -> dict:
    env = {name: os.environ[name] for name in GUEST_ENVIRONMENT if name in os.environ}
    env["PYTHONPATH"] = str(PROJECT_ROOT)  # for `-m workers.guestagent` from the guest's own cwd
    return env


def _tail(path: str, lines: int = 5) -> str:
    with open(path, "rb") as source:
        source.seek(max(0, os.fstat(source.fileno()).st_size - 2000))
        return " | ".join(source.read().decode(errors="replace").strip().splitlines()[-lines:])
