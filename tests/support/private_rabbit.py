"""Private RabbitMQ nodes (and a 3-node cluster) for fault tests.

Tests that kill or restart a broker must never touch the shared node (rabbit@localhost on
5672). Every RabbitNode has its own node name, loopback ports and data/log/config dirs
under a temp dir. As root the node runs as the `rabbitmq` user with its HOME, so it shares
the shared node's Erlang cookie and `rabbitmqctl -n NODE ...` works from a root shell too.
epmd (4369) is the system one and is never stopped.
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import amqp

RABBIT_BIN = Path(os.environ.get("DBAAS_TEST_RABBIT_BIN", "/usr/lib/rabbitmq/bin"))
RUN_AS = "rabbitmq" if os.geteuid() == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with_env(marker: bytes) -> list[int]:
    """Live processes whose environment holds marker (zombies have none left)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


class RabbitNode:
    def __init__(self, management: bool = False, name: str | None = None):
        self.name = name or f"dbaas-test-{uuid.uuid4().hex[:8]}"
        self.node = f"{self.name}@localhost"
        self.management = management
        self.port = free_port()
        self.dist_port = free_port()
        self.management_port = free_port() if management else None
        # Under /tmp itself: the rabbitmq user must reach it (a TMPDIR may be root-only).
        self.dir = Path(tempfile.mkdtemp(prefix="rmq-", dir="/tmp"))
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            + (f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
               if management else ""))
        (self.dir / "enabled_plugins").write_text(
            "[rabbitmq_management].\n" if management else "[].\n")
        # Our own env file, so /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost)
        # is not read by the server or by our CLI calls.
        (self.dir / "rabbitmq-env.conf").write_text("")
        if RUN_AS:
            user = pwd.getpwnam(RUN_AS)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def management_url(self) -> str | None:
        return f"http://127.0.0.1:{self.management_port}/" if self.management else None

    @property
    def pid_file(self) -> Path:
        return self.dir / "mnesia" / f"{self.node}.pid"

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_")) and k != "HOME"}
        env.update(
            HOME=pwd.getpwnam(RUN_AS).pw_dir if RUN_AS else os.environ["HOME"],
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_CRASH_DUMP=str(self.dir / "erl_crash.dump"),
        )
        return env

    @property
    def _marker(self) -> bytes:
        # Set for the server only (not our CLI calls) and inherited by everything beam
        # starts, even port programs that setsid() (erl_child_setup, inet_gethost).
        return f"DBAAS_TEST_RABBIT_NODE={self.node}\0".encode()

    def pids(self) -> list[int]:
        """Every live process of the server: wrapper shell, beam and its port programs."""
        return _pids_with_env(self._marker)

    def _popen_kwargs(self, env: dict | None = None) -> dict:
        kwargs = dict(env=env or self._env(), cwd=self.dir)
        if RUN_AS:
            kwargs.update(user=RUN_AS, group=RUN_AS, extra_groups=[])
        return kwargs

    def ctl(self, *args: str, tool: str = "rabbitmqctl", timeout: float = 60,
            check: bool = True) -> str:
        """Run a CLI tool (rabbitmqctl, rabbitmq-queues, ...) against this node."""
        result = subprocess.run([str(RABBIT_BIN / tool), "-q", "-n", self.node, *args],
                                capture_output=True, text=True, timeout=timeout,
                                **self._popen_kwargs())
        if check and result.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} on {self.node} failed "
                               f"({result.returncode}): {result.stdout}{result.stderr}")
        return result.stdout

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 90) -> "RabbitNode":
        """Start the node; returns once it accepts AMQP as guest (and HTTP, with management)."""
        assert not self.running, f"{self.node} already runs"
        began = time.monotonic()
        env = {**self._env(), "DBAAS_TEST_RABBIT_NODE": self.node}
        with open(self.dir / "console.log", "ab") as log:
            self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")],
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         **self._popen_kwargs(env))
        deadline = began + timeout
        while True:
            try:
                probe = amqp.Connection(f"127.0.0.1:{self.port}", userid="guest",
                                        password="guest", connect_timeout=2)
                probe.connect()
                probe.close()
                if self.management:  # its HTTP listener may come up after AMQP's
                    socket.create_connection(("127.0.0.1", self.management_port), 2).close()
                break
            except Exception as exc:  # refused, reset or not yet booted
                error = exc
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._reap()
                raise RuntimeError(f"{self.node} did not start ({error}); "
                                   f"console:\n{self._tail('console.log')}")
            time.sleep(0.2)
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self, timeout: float = 60) -> None:
        """Graceful stop through rabbitmqctl; waits until no process of the node remains."""
        if not self.running:
            return
        self.ctl("stop", timeout=timeout, check=False)
        self._reap(timeout)

    def kill(self) -> None:
        """SIGKILL the node (beam and everything it started), like a crash."""
        self._reap(0)

    def restart(self, timeout: float = 90) -> "RabbitNode":
        self.stop()
        return self.start(timeout)

    def beam_pid(self) -> int | None:
        """The running beam's pid (from the pid file the node writes at boot)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid in self.pids() else None

    @property
    def running(self) -> bool:
        return bool(self.pids())

    def _reap(self, timeout: float = 0) -> None:
        """Wait up to timeout for the node's processes to end, then SIGKILL what is left."""
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        while pids := self.pids():  # SIGKILLed processes are gone within milliseconds
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        if self.proc is not None:
            self.proc.wait(10)
            self.proc = None

    def _tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Kill whatever of the node still runs and remove its temp dir."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RabbitNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


class RabbitCluster:
    """Three (or `size`) private nodes joined into one cluster; nodes[0] is the seed."""

    def __init__(self, size: int = 3, management: bool = False):
        self.nodes = [RabbitNode(management=management) for _ in range(size)]
        self.form_seconds: float | None = None

    def start(self) -> "RabbitCluster":
        began = time.monotonic()
        try:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(RabbitNode.start, self.nodes))
                joining = self.nodes[1:]
                list(pool.map(lambda node: node.ctl("stop_app"), joining))
                # One at a time: two nodes joining at once can both fail copying the
                # seed's schema ("{aborted, {shutdown, ... sync_dump_log ...}}").
                for node in joining:
                    node.ctl("join_cluster", self.nodes[0].node)
                list(pool.map(lambda node: node.ctl("start_app"), joining))
        except BaseException:
            self.cleanup()
            raise
        self.form_seconds = time.monotonic() - began
        return self

    def node(self, name: str) -> RabbitNode:
        return next(n for n in self.nodes if n.node == name)

    @property
    def running_nodes(self) -> list[RabbitNode]:
        return [n for n in self.nodes if n.running]

    def queue_leader(self, queue: str, vhost: str = "/") -> RabbitNode:
        """The node that leads the quorum queue, asked of any running member."""
        out = self.running_nodes[0].ctl("list_queues", "-p", vhost, "name", "leader",
                                        "--formatter", "json")
        for row in json.loads(out):
            if row["name"] == queue:
                return self.node(row["leader"])
        raise LookupError(f"no queue {queue!r} in vhost {vhost!r}")

    def kill(self, node: RabbitNode) -> None:
        node.kill()

    def stop(self, node: RabbitNode) -> None:
        node.stop()

    def cleanup(self) -> None:
        # Teardown kills: the data is thrown away, and a graceful stop of the last
        # members of a cluster waits on each other.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(RabbitNode.cleanup, self.nodes))

    def __enter__(self) -> "RabbitCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
