"""A PostgreSQL cluster of its own in ``data_dir/pgdata``, listening on 127.0.0.1 (and on
the address clients reach it at, when the compute driver gives one).

Server programs (initdb, pg_ctl) refuse to run as root: an agent running as root runs
them as the ``postgres`` user, which then owns ``pgdata``. Every connection is TCP and
needs a password (scram-sha-256; no Unix socket, no trust): clients log in as ``admin``,
whose password derives from the guest's secret (dbaas.signing.admin_password,
docs/adr/0007); the agent's own clients (psql, pg_dump, pg_restore) log in as ``postgres``
with a random password made at initdb, kept owner-only in ``data_dir/superuser.pgpass``.

The postmaster runs in a session of its own, so that signals meant for the agent's
process group (a terminal's Ctrl-C, a supervisor's SIGTERM) leave it to the agent to
stop. An agent that dies without stopping it (SIGKILL) leaves it running; the next
agent adopts it (``start`` finds it running from its pid file). An instance deleted
while its agent is dead must have its postmaster stopped with ``stop_cluster``.
"""

import base64
import functools
import glob
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from dbaas.files import write_atomically
from workers.guestagent.api import DATASTORES
from workers.guestagent.datastores.base import Datastore

log = logging.getLogger(__name__)

OS_USER = "postgres"
SUPERUSER = "postgres"
ADMIN_USER = DATASTORES["postgresql"].admin_user
DATABASE = DATASTORES["postgresql"].database
HOST = "127.0.0.1"
PASSWORD_FILE = "superuser.pgpass"
# Replaces initdb's: TCP only, a password for every user, from wherever the server listens.
PG_HBA = """# written by the dbaas guest agent: a password for every connection (docs/adr/0007)
host all all 0.0.0.0/0 scram-sha-256
host all all ::/0 scram-sha-256
"""
SCRAM_ITERATIONS = 4096
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
        new_session: bool = False, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program for the cluster of *data_dir*, raising with its output
    when it fails. It runs in data_dir: the postgres user can enter it (maybe not the
    agent's own working directory), and a compute driver looking for an instance's
    processes by their directory finds it. Clients find the superuser's password in
    data_dir's password file (none in a cluster made before passwords: it trusts)."""
    command = [os.path.join(bin_dir(), program), *args]
    if as_owner and os.geteuid() == 0:
        command = ["runuser", "-u", OS_USER, "--", *command]
    env = {**os.environ, "PGCONNECT_TIMEOUT": "3", "PGPASSFILE": str(data_dir / PASSWORD_FILE)}
    result = subprocess.run(command, cwd=data_dir, capture_output=True, text=True, timeout=timeout,
                            start_new_session=new_session, env=env, input=input)
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


def scram_verifier(password: str) -> str:
    """What PostgreSQL stores of a scram-sha-256 password (RFC 5803): sent instead of the
    password, which so never reaches the server or its logs."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    encode = base64.b64encode
    return (f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{encode(salt).decode()}$"
            f"{encode(stored_key).decode()}:{encode(server_key).decode()}")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresqlDatastore(Datastore):
    backup_type = "pg_dump"
    admin_user = ADMIN_USER

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
        password = secrets.token_hex(16)
        write_atomically(self.data_dir / PASSWORD_FILE, f"*:*:*:{SUPERUSER}:{password}\n", mode=0o600)
        # initdb reads the superuser's password from a file (never its command line), as
        # the postgres user; the file goes with initdb's staging files.
        password_file = os.path.join(staging, "superuser.password")
        write_atomically(password_file, password, mode=0o600)
        hba = os.path.join(staging, "pg_hba.dbaas")
        write_atomically(hba, PG_HBA, mode=0o600)
        if os.geteuid() == 0:
            for path in (staging, password_file, hba):
                shutil.chown(path, OS_USER, OS_USER)
        pgdata = os.path.join(staging, "pgdata")
        run("initdb", "-D", pgdata, "--auth=scram-sha-256", f"--pwfile={password_file}",
            "-U", SUPERUSER, "--encoding=UTF8", "--locale=C", data_dir=self.data_dir,
            as_owner=True, timeout=SERVER_TIMEOUT)
        os.replace(hba, os.path.join(pgdata, "pg_hba.conf"))
        os.rename(pgdata, self.pgdata)
        shutil.rmtree(staging)

    def restore(self, src_path: str) -> None:
        self.create()
        self.start()
        # Objects the dump has owned by the administrator need the role to exist first.
        self.query(f"CREATE ROLE {quote_ident(ADMIN_USER)}")
        self._client("pg_restore", "-d", DATABASE, "--exit-on-error", "--single-transaction",
                     src_path, timeout=DUMP_TIMEOUT)

    def set_admin_password(self, password: str) -> None:
        role = quote_ident(ADMIN_USER)
        # Passed on stdin: not even the verifier shows in a process list.
        self._client("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", DATABASE, timeout=PROBE_TIMEOUT,
                     input=f"SELECT 'CREATE ROLE {role}' WHERE NOT EXISTS "
                           f"(SELECT FROM pg_roles WHERE rolname = '{ADMIN_USER}') \\gexec\n"
                           f"ALTER ROLE {role} WITH LOGIN SUPERUSER PASSWORD '{scram_verifier(password)}';\n")

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
        return DATASTORES["postgresql"].connection(str(self.data_dir), self.state().get("host") or HOST,
                                                   self.port)

    def _client(self, program: str, *args: str, timeout: float,
                input: str | None = None) -> subprocess.CompletedProcess:
        return run(program, "-w", "-h", HOST, "-p", str(self.port), "-U", SUPERUSER, *args,
                   data_dir=self.data_dir, timeout=timeout, input=input)
