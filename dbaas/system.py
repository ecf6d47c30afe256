"""The system of one checkout as `scripts/run` runs it: every process of the Procfile under
honcho, at most one run per var directory, and how `manage.py system status|stop` find and
stop it.

`scripts/run` runs ``python -m dbaas.system check`` before anything else (a run of this
checkout already up, or a port of the Procfile taken, is said in one line) and then
``python -m dbaas.system start``: honcho, in this process, made safe to stop.

The launcher holds ``var/run.lock`` (flock) for its life; honcho's per-process helpers
inherit it, so the lock is free only once every process of the Procfile has ended.
``var/run.pid`` names the launcher. Processes are found through ``/proc``: Linux only.
"""

import fcntl
import io
import os
import signal
import socket
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from dbaas import settings
from dbaas.settings import PROJECT_ROOT

LOCK_FILE, PID_FILE = "run.lock", "run.pid"
PROCFILE = PROJECT_ROOT / "Procfile"


class Refused(Exception):
    """scripts/run must not start: the message says why, in one line."""


# --- what must be free before a start ----------------------------------------------------

def _flower_endpoint(config) -> tuple[str, int, str]:
    # The Procfile passes --port=${FLOWER_PORT:-5555}; Flower reads FLOWER_ADDRESS itself.
    port = os.environ.get("FLOWER_PORT") or "5555"
    if not port.isdigit():
        raise Refused(f"FLOWER_PORT={port!r} is not a port number")
    return os.environ.get("FLOWER_ADDRESS", ""), int(port), "FLOWER_PORT"


def _api_endpoint(config) -> tuple[str, int, str]:
    return config.api_host, config.api_port, "DBAAS_API_PORT"


# Procfile process -> the address it listens on; checked only for lines the Procfile has.
ENDPOINTS = {"flower": _flower_endpoint, "api": _api_endpoint}


def procfile() -> dict[str, str]:
    from honcho.environ import parse_procfile
    return dict(parse_procfile(PROCFILE.read_text()).processes)


def check() -> None:
    """Raise Refused if a run of this checkout is up or a port of the Procfile is taken."""
    config = settings.get()
    if _lock_held(config):
        raise _already_running(config)
    _check_ports(config)


def _check_ports(config) -> None:
    for name in procfile():
        if name in ENDPOINTS:
            host, port, variable = ENDPOINTS[name](config)
            try:
                socket.create_server((host, port)).close()
            except OSError as exc:
                raise Refused(f"{name} cannot listen on {host or '*'}:{port}: {exc.strerror} "
                              f"({variable} chooses another port)") from None


def _already_running(config) -> Refused:
    launcher = _launcher(config)
    where = f"var directory {config.var_dir}"
    return Refused(f"already running from this checkout ({f'pid {launcher}, ' if launcher else ''}{where}): "
                   "scripts/stop stops it")


# --- the launcher --------------------------------------------------------------------------

class _Unbreakable(io.TextIOBase):
    """honcho's output. Once its reader is gone — a `| tee` killed by the same Ctrl-C, a
    closed terminal — honcho must go on stopping its processes, not die of a
    BrokenPipeError and leave them running (each runs in a session of its own)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            _to_devnull(self.stream.fileno())
        return len(text)

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return self.stream.encoding


def _to_devnull(fd: int) -> None:
    """Point ``fd``, and stderr when it is the same pipe or terminal, at /dev/null."""
    gone = os.fstat(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    for target in {fd, 2}:
        if os.path.samestat(os.fstat(target), gone):
            os.dup2(devnull, target)
    os.close(devnull)


def start() -> int:
    """Run every process of the Procfile until they stop; honcho's exit status."""
    config = settings.get()
    lock = os.open(Path(config.var_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _already_running(config) from None
    _check_ports(config)
    pid_file = Path(config.var_dir) / PID_FILE
    pid_file.write_text(f"{os.getpid()} {_stat(os.getpid()).started}\n")
    import honcho.command
    import honcho.manager
    # honcho SIGKILLs whatever still runs 5 s after the first process stopped, and has no
    # option for it: an idle worker needs 5-7 s here to stop warmly (its consumer drains,
    # then its pool ends), longer with tasks in flight.
    honcho.manager.KILL_WAIT = config.stop_timeout
    sys.stdout = _Unbreakable(sys.stdout)
    # A closed terminal stops the system like Ctrl-C; honcho handles only INT and TERM.
    signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    os.chdir(PROJECT_ROOT)  # the Procfile's commands run from the checkout
    try:
        honcho.command.main(["start"])
    except SystemExit as exc:
        return exc.code or 0
    finally:
        pid_file.unlink(missing_ok=True)
    return 0


# --- finding and stopping a run ------------------------------------------------------------

@dataclass
class Proc:
    pid: int
    ppid: int
    session: int
    state: str
    started: int


def _stat(pid: int) -> Proc | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return Proc(pid, int(fields[1]), int(fields[3]), fields[0], int(fields[19]))


def _alive(proc: Proc | None) -> bool:
    return proc is not None and proc.state not in "ZX"


def _all_processes() -> list[Proc]:
    return [p for p in map(_stat, (int(n) for n in os.listdir("/proc") if n.isdigit())) if _alive(p)]


def _lock_held(config) -> bool:
    try:
        fd = os.open(Path(config.var_dir) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _launcher(config) -> int | None:
    """The launcher's pid, if the pid file names a live one (not a recycled pid)."""
    try:
        pid, started = map(int, (Path(config.var_dir) / PID_FILE).read_text().split())
    except (OSError, ValueError):
        return None
    proc = _stat(pid)
    return pid if _alive(proc) and proc.started == started else None


def _lock_holders(config, processes: list[Proc]) -> set[int]:
    """The launcher and honcho's helpers: they hold the lock open. Found even when the
    launcher was killed and its helpers live on."""
    lock = os.path.realpath(Path(config.var_dir) / LOCK_FILE)
    holders = set()
    for proc in processes:
        try:
            if b"dbaas.system" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                continue
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            if any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") == lock for fd in fds):
                holders.add(proc.pid)
        except OSError:
            continue
    return holders


@dataclass
class Running:
    name: str       # honcho's, e.g. conductor.1
    pid: int      # the Procfile command's process
    session: int  # its session: the worker's pool processes too


def running(config=None) -> list[Running]:
    """The Procfile's processes of this checkout's run that are alive."""
    config = config or settings.get()
    if not _lock_held(config):
        return []
    processes = _all_processes()
    holders = _lock_holders(config, processes)
    found = []
    # honcho starts each command as `sh -c …` in a session of its own; the command is the
    # shell itself once it execs, else the shell's first child.
    for leader in (p for p in processes if p.ppid in holders and p.session == p.pid):
        members = [p for p in processes if p.session == leader.session]
        commands = [p for p in members if _comm(p.pid) not in SHELLS] or [leader]
        main = min(commands, key=lambda p: p.started)
        found.append(Running(_honcho_name(leader.pid), main.pid, leader.session))
    return sorted(found, key=lambda r: r.name)


SHELLS = {"sh", "dash", "bash"}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _honcho_name(pid: int) -> str:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "?"
    names = [v.partition(b"=")[2].decode() for v in environ if v.startswith(b"HONCHO_PROCESS_NAME=")]
    return names[0] if names else "?"


# --- what answers on the broker -----------------------------------------------------------

def workers(app, connection, timeout: float) -> dict[str, list[str]]:
    """Workers that answered Celery's remote control within ``timeout``, by role (what
    they consume): ``{"conductor": [...], "taskmanager": [...], "other": [...]}``."""
    config = settings.get()
    roles = {config.conductor_control_queue: "conductor", config.taskmanager_queue: "taskmanager"}
    found: dict[str, list[str]] = {"conductor": [], "taskmanager": [], "other": []}
    answers = app.control.inspect(timeout=timeout, connection=connection).active_queues() or {}
    for name, queues in sorted(answers.items()):
        role = next((roles[q["name"]] for q in queues if q["name"] in roles), "other")
        found[role].append(name)
    return found


def queue_depths(connection, names: list[str]) -> dict[str, int | None]:
    """Messages ready in each queue; None for a queue the broker does not have."""
    depths: dict[str, int | None] = {}
    for name in names:
        channel = connection.channel()
        try:
            depths[name] = channel.queue_declare(name, passive=True).message_count
        except connection.channel_errors:
            depths[name] = None
        finally:
            with suppress(*connection.channel_errors, *connection.connection_errors):
                channel.close()
    return depths


def stop(config=None, out=print) -> bool:
    """Stop this checkout's run as Ctrl-C does; False if it was not running."""
    config = config or settings.get()
    if not _lock_held(config):
        return False
    launcher = _launcher(config)
    began = time.monotonic()
    if launcher:
        out(f"stopping the system of {config.var_dir} (scripts/run's launcher, pid {launcher})")
        os.kill(launcher, signal.SIGTERM)
    else:
        # The launcher was killed: do what honcho would have done.
        out(f"stopping the system of {config.var_dir} (its launcher is gone)")
        for process in running(config):
            _signal_group(process.session, signal.SIGTERM)
    # The launcher SIGKILLs what is left after DBAAS_STOP_TIMEOUT; without one, this does.
    deadline = began + config.stop_timeout + 10
    while _lock_held(config):
        if time.monotonic() > deadline:
            if launcher:
                raise Refused(f"still running {config.stop_timeout + 10:.0f} s after SIGTERM "
                              f"to pid {launcher}")
            for process in running(config):
                for proc in _all_processes():
                    if proc.session == process.session:
                        _signal(proc.pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.2)
    out(f"stopped in {time.monotonic() - began:.1f} s")
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    try:
        if argv == ["check"]:
            check()
            return 0
        if argv == ["start"]:
            return start()
    except (Refused, settings.SettingError, OSError) as exc:
        print(f"scripts/run: {exc}", file=sys.stderr)
        return 1
    print("usage: python -m dbaas.system check|start", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
