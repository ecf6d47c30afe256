"""A PostgreSQL cluster of its own in ``data_dir/pgdata``, listening on 127.0.0.1 only.

Server programs (initdb, pg_ctl) refuse to run as root: an agent running as root runs
them as the ``postgres`` user, which then owns ``pgdata``. Clients (psql, pg_dump,
pg_restore) connect over TCP with the cluster's trust authentication as ``postgres``.

The postmaster runs in a session of its own, so that signals meant for the agent's
process group (a terminal's Ctrl-C, a supervisor's SIGTERM) leave it to the agent to
stop. An agent that dies without stopping it (SIGKILL) leaves it running; the next
agent adopts it (``start`` finds it running from its pid file). An instance deleted
while its agent is dead must have its postmaster stopped with ``stop_cluster``.
"""

import functools
import glob
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from workers.guestagent.datastores.base import Datastore

log = logging.getLogger(__name__)

OS_USER = "postgres"
SUPERUSER = "postgres"
DATABASE = "postgres"
HOST = "127.0.0.1"
# Seconds: a probe answers quickly or counts as failed; starting and stopping wait for
# recovery and checkpoints; a dump or restore running longer than a day is stuck.
PROBE_TIMEOUT = 5
SERVER_TIMEOUT = 120
DUMP_TIMEOUT = 24 * 3600
INITDB_PREFIX = "pgdata.initdb-"


@functools.cache
def bin_dir() -> str:
    """The newest installed server's programs (Debian layout), else those on PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin")
    if found:
        return max(found, key=lambda path: [int(n) for n in re.findall(r"\d+", path)])
    initdb = shutil.which("initdb")
    if initdb is None:
        raise FileNotFoundError("no PostgreSQL server programs (initdb) found")
    return os.path.dirname(initdb)


def run(program: str, *args: str, data_dir: Path, as_owner: bool = False, timeout: float,
        new_session: bool = False) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program for the cluster of *data_dir*, raising with its output
    when it fails. It runs in data_dir: the postgres user can enter it (maybe not the
    agent's own working directory), and a compute driver looking for an instance's
    processes by their directory finds it."""
    command = [os.path.join(bin_dir(), program), *args]
    if as_owner and os.geteuid() == 0:
        command = ["runuser", "-u", OS_USER, "--", *command]
    result = subprocess.run(command, cwd=data_dir, capture_output=True, text=True, timeout=timeout,
                            start_new_session=new_session, env={**os.environ, "PGCONNECT_TIMEOUT": "3"})
    if result.returncode != 0:
        raise RuntimeError(f"{program} exited with {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return result


def cluster_running(pgdata: Path) -> bool:
    """pg_ctl status: 0 running, 3 not running, 4 no data directory."""
    if not pgdata.is_dir():
        return False
    try:
        run("pg_ctl", "status", "-D", str(pgdata), data_dir=pgdata.parent, as_owner=True,
            timeout=PROBE_TIMEOUT)
        return True
    except RuntimeError:
        return False


def stop_cluster(data_dir: str | os.PathLike, mode: str = "immediate") -> None:
    """Stop the postmaster of the guest whose data_dir this is, if one runs. For the
    compute driver deleting an instance whose agent may be dead."""
    pgdata = Path(data_dir) / "pgdata"
    if cluster_running(pgdata):
        run("pg_ctl", "stop", "-D", str(pgdata), "-m", mode, "-w", "-t", str(SERVER_TIMEOUT),
            data_dir=pgdata.parent, as_owner=True, timeout=SERVER_TIMEOUT + 10)


def free_port() -> int:
    """A port nobody listens on now (another process may take it before us: then start
    fails and the instance reports crashed)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class PostgresqlDatastore(Datastore):
    backup_type = "pg_dump"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def port(self) -> int:
        return int(self.state()["port"])

    def settings(self, port: int | None, host: str | None) -> dict:
        # A prepare redone after a crash keeps the port it chose the first time.
        return {"port": port or self.state().get("port") or free_port(),
                "host": host or self.state().get("host") or HOST}

    def discard(self) -> None:
        stop_cluster(self.data_dir)
        for leftover in (self.pgdata, *self.data_dir.glob(f"{INITDB_PREFIX}*")):
            shutil.rmtree(leftover, ignore_errors=True)

    def create(self) -> None:
        # initdb works in a directory of its own, renamed to pgdata once complete: an
        # initdb killed midway leaves a pid file of its bootstrap backend that pg_ctl
        # cannot stop (nor tell from a live one while the dead backend awaits its reaper).
        staging = tempfile.mkdtemp(prefix=INITDB_PREFIX, dir=self.data_dir)
        if os.geteuid() == 0:
            shutil.chown(staging, OS_USER, OS_USER)
        run("initdb", "-D", staging, "-A", "trust", "-U", SUPERUSER, "--encoding=UTF8",
            "--locale=C", data_dir=self.data_dir, as_owner=True, timeout=SERVER_TIMEOUT)
        os.rename(staging, self.pgdata)

    def restore(self, src_path: str) -> None:
        self.create()
        self.start()
        self._client("pg_restore", "-d", DATABASE, "--exit-on-error", "--single-transaction",
                     src_path, timeout=DUMP_TIMEOUT)

    def start(self) -> None:
        if cluster_running(self.pgdata):
            log.info("the server of %s is running already: adopting it", self.pgdata)
            return
        # No Unix socket: clients use TCP, and a socket path under a deep data_dir can
        # exceed the 107-byte limit, which would stop the server from starting.
        listen = ",".join(dict.fromkeys((HOST, self.state().get("host") or HOST)))
        options = f"-p {self.port} -c listen_addresses={listen} -c unix_socket_directories="
        run("pg_ctl", "start", "-D", str(self.pgdata), "-l", str(self.pgdata / "server.log"),
            "-o", options, "-w", "-t", str(SERVER_TIMEOUT), data_dir=self.data_dir,
            as_owner=True, timeout=SERVER_TIMEOUT + 10, new_session=True)

    def stop(self) -> None:
        stop_cluster(self.data_dir, mode="fast")

    def query(self, sql: str, timeout: float = PROBE_TIMEOUT) -> str:
        """Run *sql* with psql; its unaligned, tuples-only output."""
        return self._client("psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", DATABASE, "-tAc", sql,
                            timeout=timeout).stdout.strip()

    def probe(self) -> bool:
        try:
            return self.query("select 1") == "1"
        except (RuntimeError, OSError, subprocess.TimeoutExpired, KeyError):  # KeyError: no port yet
            return False

    def backup(self, dest_path: str) -> None:
        self._client("pg_dump", "-Fc", "-f", dest_path, DATABASE, timeout=DUMP_TIMEOUT)

    def connection_info(self) -> dict:
        return {"host": self.state().get("host") or HOST, "port": self.port, "user": SUPERUSER,
                "database": DATABASE}

    def _client(self, program: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return run(program, "-w", "-h", HOST, "-p", str(self.port), "-U", SUPERUSER, *args,
                   data_dir=self.data_dir, timeout=timeout)
