"""One guest agent per instance, and a record of which process it is, in the instance's data.

The agent holds ``data_dir/agent.lock`` (flock) while it runs — the kernel drops it when the
process ends, SIGKILL included — and, once it holds it, writes ``data_dir/agent.pid``: its
pid and start time (clock ticks after boot, from /proc), which together name one process
for good even when pids are reused. A second agent of the instance — started by hand, or by
a taskmanager that did not know of the first — finds the lock taken and exits; whoever must
stop the instance's agent (the compute driver, at delete) finds it through agent.pid,
however and from wherever it was started.

Standard library only (Linux's /proc): the compute driver uses it through ``api.py``.
"""

import fcntl
import os

from dbaas.files import write_atomically

LOCK_FILE, PID_FILE = "agent.lock", "agent.pid"


class AlreadyRunning(Exception):
    """Another agent holds the instance's lock."""

    def __init__(self, data_dir: str, pid: int | None):
        self.pid = pid
        holder = f"pid {pid}" if pid else "a process that is still starting"
        super().__init__(f"another guest agent runs for the data in {data_dir} ({holder}): "
                         f"not starting a second one")


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot); None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as source:
            text = source.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ")".
    fields = text.rpartition(")")[2].split()
    return None if fields[0] in "ZX" else int(fields[19])


def hold(data_dir: str) -> int:
    """Take the instance's lock and record this process; the descriptor to keep open (the
    lock lasts as long as it). AlreadyRunning if another agent holds it."""
    os.makedirs(data_dir, exist_ok=True)
    # Not inherited (Python's default): a postmaster the agent starts must not keep the
    # lock once the agent is gone.
    fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(data_dir, running_agent(data_dir)) from None
    write_atomically(os.path.join(data_dir, PID_FILE), f"{os.getpid()} {start_time(os.getpid())}")
    return fd


def release(data_dir: str, fd: int) -> None:
    """Remove this process's record, then the lock: a clean exit leaves nothing stale."""
    if running_agent(data_dir) == os.getpid():
        os.unlink(os.path.join(data_dir, PID_FILE))
    os.close(fd)


def running_agent(data_dir: str) -> int | None:
    """The pid of the agent recorded in ``data_dir``, if that very process still runs."""
    try:
        with open(os.path.join(data_dir, PID_FILE)) as source:
            pid, started = map(int, source.read().split())
    except (OSError, ValueError):
        return None
    return pid if start_time(pid) == started else None
