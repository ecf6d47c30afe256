"""`scripts/run` as an operator runs it: in a terminal (a pty with an interactive shell, which
gives each command line a process group of its own and makes it the foreground job, as a
login terminal does) or in the background; the processes of one run, found by the var
directory in their environment; and a call held in flight inside the conductor.

Nothing here signals a process that is not of the test's own var directory.
"""

import os
import pty
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tests.support.services import ROOT, wait_until

# A database URL that leads nowhere: what manage.py gets (only the conductor holds one).
NOWHERE = "postgresql://nobody@127.0.0.1:1/no-such-database"
# The demo's line once every process of the Procfile is up and the demo instance ACTIVE.
UP = "Flower: http://"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_env(tmp_path: Path, **extra) -> dict:
    """The environment of a run of its own: var directory and ports of this test, no
    PYTHONPATH (scripts/run needs none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBAAS_", "FLOWER_", "PYTHON"))}
    env.update(DBAAS_VAR_DIR=str(tmp_path / "var"), FLOWER_PORT=str(free_port()),
               DBAAS_API_PORT=str(free_port()), DBAAS_METRICS_PORT=str(free_port()),
               TERM="dumb", PS1="$ ", **extra)
    return env


def client_env(env: dict, **extra) -> dict:
    return {**env, "DBAAS_DATABASE_URL": NOWHERE, **extra}


def manage_py(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=client_env(env),
                          capture_output=True, text=True, timeout=timeout)


def processes_of(var_dir: str, spare: tuple[int, ...] = ()) -> dict[int, str]:
    """Live processes started with this var directory (every process of a run: the script,
    the launcher, honcho's helpers, the Procfile's processes and their pools, `| tee`);
    pid -> command line."""
    marker = f"DBAAS_VAR_DIR={var_dir}".encode()
    found = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()[0]
            command = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in environ and state not in "ZX" and int(name) not in spare:
            found[int(name)] = command
    return found


def end_everything(var_dir: str) -> None:
    """SIGKILL whatever a failed test left: the run's processes and its guests (guests get
    none of the control plane's environment; their command line names their config)."""
    guests = f"{var_dir}/instances/".encode()
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if guests in cmdline:
            _kill(int(name))
    for pid in processes_of(var_dir):
        _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Terminal:
    """An interactive bash in a pty; its output is read all along, so it never blocks."""

    def __init__(self, env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(ROOT)
            os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], env)
        self._output = bytearray()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(self.fd,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        # A read in progress would keep the terminal open after close(): poll instead.
        while not self._closing.is_set():
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: every process of the terminal is gone
                return
            if not data:
                return
            self._output += data

    def output(self) -> str:
        return self._output.decode(errors="replace")

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")  # the line discipline turns it into SIGINT to the foreground job

    def hang_up(self) -> None:
        """Close the terminal: the kernel sends SIGHUP to the shell, which passes it on."""
        self._closing.set()
        self._reader.join()
        os.close(self.fd)
        self.fd = None

    def close(self) -> None:
        if self.fd is not None:
            self.hang_up()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


class BackgroundRun:
    """scripts/run started as from another terminal, its output in a file."""

    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path = env, log_path
        self.var_dir = env["DBAAS_VAR_DIR"]
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen([str(ROOT / "scripts" / "run")], cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self, timeout: float = 240) -> "BackgroundRun":
        wait_until(lambda: UP in self.log() or self.process.poll() is not None, timeout=timeout,
                   interval=0.5, message="scripts/run up")
        assert self.process.poll() is None, self.log()[-5000:]
        return self

    def end(self) -> None:
        if self.process.poll() is None:
            subprocess.run([str(ROOT / "scripts" / "stop")], cwd=ROOT, env=self.env, capture_output=True,
                           timeout=120)
        end_everything(self.var_dir)
        self.process.wait(timeout=30)


@contextmanager
def database_locked(var_dir: str):
    """The run's SQLite database write-locked: every conductor task (each begins with BEGIN
    IMMEDIATE) waits until the block ends."""
    connection = sqlite3.connect(Path(var_dir) / "dbaas.sqlite3", isolation_level=None, timeout=30)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
        connection.execute("ROLLBACK")
    finally:
        connection.close()


# Held past honcho's own 5 s before SIGKILL: a stop that does not wait warmly kills the call.
HOLD_SECONDS = 7
# Everything gone this long after the stop began (measured here: 7-9 s for an idle run).
STOP_BOUND = HOLD_SECONDS + 40


def stop_with_a_call_in_flight(tmp_path: Path, stop) -> dict:
    """Run `scripts/run 2>&1 | tee LOG` in a terminal, hold a conductor call in flight,
    call ``stop(terminal, env)``, and check: the call is answered, every process of the
    run is gone within STOP_BOUND, no error anywhere. The terminal's output and the log."""
    env = run_env(tmp_path)
    var_dir, log = env["DBAAS_VAR_DIR"], tmp_path / "run.log"
    terminal = Terminal(env)
    try:
        terminal.type(f"scripts/run 2>&1 | tee {log}")
        wait_until(lambda: UP in terminal.output(), timeout=240, interval=0.5, message="scripts/run up")
        with database_locked(var_dir):
            call = subprocess.Popen([sys.executable, "manage.py", "backup", "list", "--json"], cwd=ROOT,
                                    env=client_env(env, DBAAS_CALL_TIMEOUT="120"), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            wait_until(lambda: "Task conductor.backup_list[" in log.read_text(), timeout=60,
                       message="the call received by the conductor")
            began = time.monotonic()
            stopped = stop(terminal, env)
            time.sleep(HOLD_SECONDS)
            assert processes_of(var_dir, spare=(terminal.pid,)), "stopped before the call was answered"
        out, err = call.communicate(timeout=120)
        assert call.returncode == 0 and out.strip() == "[]", err
        wait_until(lambda: not processes_of(var_dir, spare=(terminal.pid,)), timeout=STOP_BOUND,
                   message="every process of the run gone")
        took = time.monotonic() - began
        text = terminal.output() + log.read_text(errors="replace")
        for bad in ("Traceback", "ERROR", "Error"):
            assert bad not in text, text[-5000:]
        return {"terminal": terminal.output(), "log": log.read_text(errors="replace"), "seconds": took,
                "stopped": stopped}
    finally:
        terminal.close()
        end_everything(var_dir)
