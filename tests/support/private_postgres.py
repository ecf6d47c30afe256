"""A private PostgreSQL cluster for fault tests (never the shared one on 5432).

initdb refuses to run as root, so as root everything runs as the `postgres` user. The
data dir doubles as the unix socket dir; it lives directly under /tmp because a socket
path must stay under ~107 characters.
"""

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2

from tests.support.private_rabbit import free_port

PG_BIN = Path(os.environ.get("DBAAS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
RUN_AS = "postgres" if os.geteuid() == 0 else None


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class PostgresServer:
    def __init__(self):
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
        self.data = self.base / "data"
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self.initdb_seconds: float | None = None
        if RUN_AS:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.base, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    @staticmethod
    def _as_user() -> dict:
        return dict(user=RUN_AS, group=RUN_AS, extra_groups=[]) if RUN_AS else {}

    def _run(self, *cmd: str, timeout: float = 120) -> str:
        result = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL, **self._as_user())
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): "
                               f"{result.stdout}{result.stderr}\n{self._log_tail()}")
        return result.stdout

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.base / "server.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def _pg_ctl(self, *args: str, timeout: float = 120) -> str:
        return self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args, timeout=timeout)

    def start(self, timeout: float = 60) -> "PostgresServer":
        """initdb on first start, then start the postmaster; returns once it accepts connections."""
        if not (self.data / "PG_VERSION").exists():
            began = time.monotonic()
            self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale", "C")
            self.initdb_seconds = time.monotonic() - began
        began = time.monotonic()
        # The postmaster runs as our child rather than daemonized by `pg_ctl start`: an
        # orphaned postmaster that is killed stays a zombie until PID 1 reaps it (~1 s on
        # this machine, never in some containers), and while its pid exists a new
        # postmaster refuses to start ("lock file postmaster.pid already exists").
        # fsync=off: these clusters are thrown away.
        with open(self.base / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-k", str(self.data), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                cwd=self.base, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, **self._as_user())
        deadline = began + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"postgres did not start:\n{self._log_tail()}")
            time.sleep(0.02)
        self.start_seconds = time.monotonic() - began
        return self

    def _ready(self) -> bool:
        """What `pg_ctl -w` waits for: our postmaster's pid file says "ready"."""
        try:
            lines = (self.data / "postmaster.pid").read_text().split("\n")
            return int(lines[0]) == self.proc.pid and lines[7].strip() == "ready"
        except (OSError, IndexError, ValueError):
            return False

    def postmaster_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m fast|smart|immediate -w; no-op if it does not run."""
        if self.postmaster_pid() is not None:
            self._pg_ctl("-m", mode, "-w", "stop")
            self.proc.wait(30)
        self.proc = None

    def restart(self, mode: str = "fast") -> "PostgresServer":
        self.stop(mode)
        return self.start()

    def kill(self, timeout: float = 10) -> None:
        """SIGKILL the postmaster, like a crash, and wait until its children have left too.

        Backends notice the postmaster's death by themselves; a new postmaster refuses to
        start while any of them still holds the old shared memory, so wait for them.
        """
        pid = self.postmaster_pid()
        if pid is not None:
            children = _children(pid)
            os.kill(pid, signal.SIGKILL)
            self.proc.wait(30)
            deadline = time.monotonic() + timeout
            while any(map(_alive, children)) and time.monotonic() < deadline:
                time.sleep(0.02)
            for child in filter(_alive, children):
                os.kill(child, signal.SIGKILL)
            while any(map(_alive, children)):
                time.sleep(0.02)
        self.proc = None

    def create_database(self, name: str) -> str:
        conn = psycopg2.connect(self.url)
        try:
            conn.autocommit = True
            conn.cursor().execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.database_url(name)

    def cleanup(self) -> None:
        """Stop it at once (immediate, then SIGKILL if need be) and remove the temp dir."""
        try:
            self.stop("immediate")
        except Exception:
            pass
        self.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
