"""Guests in network namespaces of their own (DBAAS_COMPUTE_DRIVER=netns), with real guest
agents on RabbitMQ and PostgreSQL: from inside a namespace only the broker's port answers
(PostgreSQL's port on the host does not, through any address), and the instance still
reaches ACTIVE, backs up and restores into another namespace; deleting it leaves no
namespace, veth or rule. With its broker link cut for 30 s, an instance turns ERROR at the
heartbeat expiry and ACTIVE again afterwards, and a backup that finished during the cut is
reported COMPLETED once the link is back.

Needs root, iproute2 and nftables. Every namespace, veth and table of the test's instances
is removed afterwards, also when the test failed."""

import glob
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest

from dbaas import db
from dbaas.models import Backup
from dbaas.status import api_status
from tests.support.services import Beat, wait_until
from tests.support.stack import Running, configure, instance_row, processes_of
from workers.guestagent.datastores import postgresql as pg
from workers.guestagent.datastores.postgresql import bin_dir
from workers.guestagent.api import GuestConfig
from workers.taskmanager import guests
from workers.taskmanager.compute import SpawnError
from workers.taskmanager.compute.local import instance_dir, instances_root
from workers.taskmanager.compute.netns import (NETWORK_FILE, Names, NetnsDriver, leftovers_of,
                                               remove_network)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("nft")),
                                reason="needs root, iproute2 and nftables")
ON_RABBITMQ = pytest.mark.parametrize("stack", ["rabbitmq-postgresql"], indirect=True)

WAIT = ("--wait", "--timeout", "180", "--json")
BROKER_PORT = 5672
# The host's PostgreSQL (the control plane's database) and RabbitMQ's management API, which
# listens on every address of the host.
CONTROL_DB_PORT, MANAGEMENT_PORT = 5432, 15672


def postgres_server_programs() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture
def reachable_var_dir(stack, monkeypatch):
    """A var dir the ``postgres`` OS user can reach (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="dbaas-netns-var-")
    os.chmod(path, 0o711)
    configure(monkeypatch, DBAAS_VAR_DIR=path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def netns_system(stack, reachable_var_dir, tmp_path):
    """launch(beat=False, **env) -> conductor and taskmanager (DBAAS_COMPUTE_DRIVER=netns),
    and beat if asked. Afterwards every instance's guest, namespace, veth and table is
    removed, whatever the test did, and checked gone."""
    started, beats, seen = [], [], set()

    def launch(beat: bool = False, **env) -> Running:
        running = Running(stack, None)
        extra = {"DBAAS_COMPUTE_DRIVER": "netns", **env}
        running.env.update(extra)
        running.client_env.update(extra)
        running.seen, running.log_dir = seen, tmp_path
        started.append(running.start())
        if beat:
            beats.append(Beat(running.client_env, tmp_path))
        return running
    yield launch
    for beat in beats:
        beat.stop()
    root = Path(instances_root())
    if root.exists():
        seen.update(path.name for path in root.iterdir())
    for instance_id in seen:
        keep_guest_log(instance_id, tmp_path)
        try:
            NetnsDriver(stop_timeout=2).destroy(instance_id)
        finally:
            remove_network(instance_id, grace=2)  # also when destroy failed midway
    for running in started:
        running.stop()
    assert {i: leftovers_of(i) for i in seen if leftovers_of(i)} == {}


@pytest.fixture
def driver(monkeypatch, tmp_path):
    """The driver alone, with a guest that sleeps: no broker or database is contacted."""
    configure(monkeypatch, DBAAS_VAR_DIR=str(tmp_path / "var"), DBAAS_SERVICE_KEY="not-for-guests",
              DBAAS_BROKER_URL="amqp://guest:guest@127.0.0.1:5672/unused")
    made = []

    def make(**options) -> NetnsDriver:
        made.append(NetnsDriver([sys.executable, "-c", "import time; time.sleep(600)"], stop_timeout=1,
                                **options))
        return made[-1]
    yield make
    root = Path(instances_root())
    for instance_id in (path.name for path in root.iterdir()) if root.exists() else ():
        try:
            made[0].destroy(instance_id)
        finally:
            remove_network(instance_id, grace=1)


def test_the_driver_is_idempotent_and_removes_everything(driver):
    """What a redelivered or concurrent create does: the same answers, one guest, one
    network, whatever was lost rebuilt; and destroy, twice, leaves nothing."""
    netns = driver()
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    with ThreadPoolExecutor(4) as pool:  # two deliveries of each create, side by side
        answers = list(pool.map(lambda i: (netns.allocate_endpoint(i), netns.broker_endpoint(i)),
                                [first, first, second, second]))
    assert answers[0] == answers[1] and answers[2] == answers[3]
    (guest_ip, port), (host_ip, broker_port) = answers[0]
    assert (host_ip, broker_port, guest_ip) == (network_of(first)["host_ip"], BROKER_PORT,
                                                network_of(first)["guest_ip"])
    assert network_of(second)["host_ip"] != host_ip
    assert answers[2][0][1] != port

    config = GuestConfig(instance_id=first, secret="s", broker_url="amqp://unused")
    netns.spawn(first, config)
    pid = guest_pid(first)
    netns.spawn(first, config)  # redelivered: the guest runs, nothing started
    assert guest_pid(first) == pid and netns.is_running(first)
    assert subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True
                          ).stdout.split() == [Names.of(first).namespace]

    # Lost rules (an operator's `nft flush ruleset`, a guest root in its namespace) come
    # back with the next create's first call.
    names = Names.of(first)
    subprocess.run(["nft", "delete", "table", "inet", names.table], check=True)
    assert inside(first, "nft", "delete", "table", "inet", "dbaas_guest").returncode == 0
    assert netns.allocate_endpoint(first) == (guest_ip, port)
    assert subprocess.run(["nft", "list", "table", "inet", names.table], capture_output=True).returncode == 0
    assert f"tcp dport {port}" in inside(first, "nft", "list", "table", "inet", "dbaas_guest").stdout

    for instance_id in (first, second):
        netns.destroy(instance_id)
        netns.destroy(instance_id)
        assert leftovers_of(instance_id) == [] and not Path(instance_dir(instance_id)).exists()
    assert processes_of(first) == [] and not Path(f"/proc/{pid}").exists()


def test_a_range_the_host_uses_is_never_taken(driver):
    """Every /30 of a range the host has addresses or routes in is skipped: 127.0.0.0/29 is
    all loopback, so nothing is allocated and nothing made."""
    instance_id = str(uuid.uuid4())
    with pytest.raises(SpawnError, match="no free /30"):
        driver(subnet="127.0.0.0/29").broker_endpoint(instance_id)
    assert leftovers_of(instance_id) == []


def keep_guest_log(instance_id: str, log_dir: Path) -> None:
    """A copy beside the test's other logs: the instance's directory goes with it."""
    guest_log = Path(instance_dir(instance_id)) / "guest.log"
    if guest_log.exists():
        shutil.copy(guest_log, log_dir / f"guest-{instance_id}.log")


def create(system, name: str, *options: str) -> dict:
    result = system.cli("instance", "create", name, *options, *WAIT, timeout=240)
    assert result.returncode == 0, result.stderr + system.taskmanager.log() + "".join(
        Path(log).read_text() for log in glob.glob(os.path.join(instances_root(), "*", "guest.log")))
    view = json.loads(result.stdout)
    system.seen.add(view["id"])
    assert view["status"] == "ACTIVE", view
    return view


def network_of(instance_id: str) -> dict:
    """The instance's names and addresses, as the driver recorded them."""
    import ipaddress
    subnet = ipaddress.IPv4Network(json.loads((Path(instance_dir(instance_id)) / NETWORK_FILE).read_text())["subnet"])
    names = Names.of(instance_id)
    return {"names": names, "host_ip": str(subnet.network_address + 1),
            "guest_ip": str(subnet.network_address + 2)}


def inside(instance_id: str, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", Names.of(instance_id).namespace, *command],
                          capture_output=True, text=True, timeout=timeout)


PROBE = """
import socket, sys
from concurrent.futures import ThreadPoolExecutor
def attempt(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.5).close()
        return "connected"
    except OSError as exc:
        return f"{type(exc).__name__} {exc}"
with ThreadPoolExecutor(len(sys.argv) - 1) as pool:
    for target, outcome in zip(sys.argv[1:], pool.map(attempt, sys.argv[1:])):
        print(target, outcome)
"""


def connect_from_inside(instance_id: str, *targets: tuple[str, int]) -> dict:
    """(host, port) -> 'connected', or why a TCP connection from inside the namespace failed."""
    result = inside(instance_id, sys.executable, "-c", PROBE, *(f"{h}:{p}" for h, p in targets))
    outcomes = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    return {(h, p): outcomes.get(f"{h}:{p}", result.stderr) for h, p in targets}


def host_addresses() -> list[str]:
    listed = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True)
    return [info["local"] for entry in json.loads(listed.stdout) for info in entry["addr_info"]]


def guest_pid(instance_id: str) -> int:
    return int((Path(instance_dir(instance_id)) / "guest.pid").read_text().split()[0])


def assert_fenced(instance_id: str) -> dict:
    """The guest runs in its namespace, reaches the broker through the host's end of its
    veth, and nothing else: not PostgreSQL's port, through any address."""
    net = network_of(instance_id)
    names = net["names"]
    identified = subprocess.run(["ip", "netns", "identify", str(guest_pid(instance_id))],
                                capture_output=True, text=True, check=True).stdout.split()
    assert identified == [names.namespace]
    config = json.loads((Path(instance_dir(instance_id)) / "guest.json").read_text())
    assert f"@{net['host_ip']}:{BROKER_PORT}/" in config["broker_url"]

    broker = (net["host_ip"], BROKER_PORT)
    refused = [(net["host_ip"], CONTROL_DB_PORT), ("127.0.0.1", CONTROL_DB_PORT),
               (net["host_ip"], MANAGEMENT_PORT), (net["host_ip"], 22)]
    outcomes = connect_from_inside(instance_id, broker, *refused)
    assert outcomes.pop(broker) == "connected"
    assert "connected" not in outcomes.values(), outcomes
    # The host's own addresses (127.0.0.1 of the host, its LAN address) have no route at
    # all: asked of the kernel, nothing is sent.
    for address in host_addresses():
        if address in ("127.0.0.1", net["host_ip"]):
            continue  # the namespace's own loopback, and its veth's other end (tried above)
        route = inside(instance_id, "ip", "route", "get", address)
        assert route.returncode != 0 and "unreachable" in route.stderr, (address, route.stdout)

    # Defence in depth: with the namespace's own table gone (a guest that is root there
    # could delete it), the host's table still drops everything but the broker.
    assert inside(instance_id, "nft", "delete", "table", "inet", "dbaas_guest").returncode == 0
    try:
        outcomes = connect_from_inside(instance_id, broker, *(t for t in refused if t[0] == net["host_ip"]))
        assert outcomes.pop(broker) == "connected"
        assert "connected" not in outcomes.values(), outcomes
    finally:
        NetnsDriver().network(instance_id)  # rebuilds what is missing
    assert "dbaas_guest" in inside(instance_id, "nft", "list", "tables").stdout
    return net


def delete_all(system, instance_ids: list[str]) -> None:
    for instance_id in instance_ids:
        keep_guest_log(instance_id, system.log_dir)
        system.ok("instance", "delete", instance_id)
    for instance_id in instance_ids:
        wait_until(lambda: instance_row(instance_id).deleted, timeout=120, message="the instance deleted")
        assert processes_of(instance_id) == []
        assert not Path(instance_dir(instance_id)).exists()
        assert leftovers_of(instance_id) == []


@ON_RABBITMQ
def test_sqlite_guests_in_namespaces_back_up_and_restore(netns_system):
    system = netns_system()
    source = create(system, "source")
    assert_fenced(source["id"])
    with closing(sqlite3.connect(Path(instance_dir(source["id"])) / "data" / "db.sqlite3")) as database, database:
        database.execute("create table kept (value text)")
        database.execute("insert into kept values ('from the source')")

    backup = system.ok("backup", "create", source["id"], "nightly", *WAIT)
    assert backup["state"] == "COMPLETED" and backup["backup_type"] == "sqlite-online"
    stored = Path(guests.backup_root()) / backup["id"]
    assert backup["checksum"] == hashlib.sha256(stored.read_bytes()).hexdigest()

    copy = create(system, "copy", "--restore-from", backup["id"])
    copy_net = assert_fenced(copy["id"])
    assert copy_net["host_ip"] != network_of(source["id"])["host_ip"]
    with closing(sqlite3.connect(Path(instance_dir(copy["id"])) / "data" / "db.sqlite3")) as database:
        assert database.execute("select value from kept").fetchall() == [("from the source",)]
    delete_all(system, [source["id"], copy["id"]])


def psql(instance_id: str, port: int, *options: str) -> tuple[list[str], dict]:
    """psql inside the instance's namespace, at its PostgreSQL's 127.0.0.1, logged in as
    the agent's own clients are (the superuser's password file, when the cluster has one)."""
    data = Path(instance_dir(instance_id)) / "data"
    env = {**os.environ, "PGCONNECT_TIMEOUT": "5",
           "PGPASSFILE": str(data / getattr(pg, "PASSWORD_FILE", "superuser.pgpass"))}
    return (["ip", "netns", "exec", Names.of(instance_id).namespace, os.path.join(bin_dir(), "psql"),
             "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port), "-U", pg.SUPERUSER,
             "-d", pg.DATABASE, *options], env)


def psql_inside(instance_id: str, port: int, sql: str) -> str:
    command, env = psql(instance_id, port, "-tAc", sql)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_clients_reach(view: dict) -> None:
    """A client on the host reaches the instance's PostgreSQL at the address `instance
    show` gives: the server answers the protocol's SSLRequest (with S or N)."""
    with socket.create_connection((view["host"], view["port"]), timeout=5) as connection:
        connection.sendall(struct.pack("!ii", 8, 80877103))
        assert connection.recv(1) in (b"S", b"N")


@ON_RABBITMQ
@pytest.mark.skipif(not postgres_server_programs(), reason="needs PostgreSQL server programs")
def test_postgresql_guests_in_namespaces_back_up_and_restore(netns_system):
    system = netns_system()
    source = create(system, "pg", "--datastore", "postgresql")
    net = assert_fenced(source["id"])
    assert source["host"] == net["guest_ip"]
    assert_clients_reach(source)
    psql_inside(source["id"], source["port"], "create table kept (value text); "
                                              "insert into kept values ('from the source')")

    backup = system.ok("backup", "create", source["id"], "nightly", *WAIT)
    assert backup["state"] == "COMPLETED" and backup["backup_type"] == "pg_dump"
    copy = create(system, "pg-copy", "--restore-from", backup["id"])
    copy_net = assert_fenced(copy["id"])
    assert copy["host"] == copy_net["guest_ip"] != source["host"]
    assert_clients_reach(copy)
    assert psql_inside(copy["id"], copy["port"], "select value from kept") == "from the source"
    delete_all(system, [source["id"], copy["id"]])


EXPIRY, CUT = 6.0, 30.0
SHORT_TIMEOUTS = {
    "DBAAS_GUEST_HEARTBEAT_INTERVAL": "1",
    "DBAAS_AGENT_HEARTBEAT_EXPIRY": str(EXPIRY),
    "DBAAS_SWEEP_INTERVAL": "1",
}


def status(instance_id: str) -> str:
    row = instance_row(instance_id)
    return api_status(deleted=row.deleted, task_status=row.task_status,
                      service_status=row.service_status, fault_kind=row.fault_kind)


def backup_row(backup_id: str) -> Backup:
    with db.session_scope() as session:
        return session.get(Backup, backup_id)


def waiting_reports(instance_id: str) -> list[dict]:
    """The backup reports the guest keeps in its outbox until the broker confirms them."""
    outbox = Path(instance_dir(instance_id)) / "data" / "outbox"
    reports = []
    for path in sorted(outbox.glob("*.json")):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # delivered and removed meanwhile
    return reports


@pytest.mark.fault
@ON_RABBITMQ
@pytest.mark.skipif(not postgres_server_programs(), reason="needs PostgreSQL server programs")
def test_a_cut_broker_link_turns_error_and_recovers_without_losing_a_report(netns_system):
    system = netns_system(beat=True, **SHORT_TIMEOUTS)
    view = create(system, "cut", "--datastore", "postgresql")
    instance_id, port = view["id"], view["port"]
    host_if = Names.of(instance_id).host_if
    psql_inside(instance_id, port, "create table kept as select g as value from generate_series(1, 1000) g")

    # Hold the table so that the backup's pg_dump waits for it: the backup is running,
    # and only then is the link cut.
    command, env = psql(instance_id, port, "-q", "-tA")
    locker = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    cut = False
    try:
        locker.stdin.write("begin; lock table kept in access exclusive mode; select 'locked';\n")
        locker.stdin.flush()
        assert locker.stdout.readline().strip() == "locked"
        backup_id = system.ok("backup", "create", instance_id, "nightly", "--json")["id"]
        wait_until(lambda: backup_row(backup_id).state == "BUILDING", timeout=60, message="BUILDING")
        wait_until(lambda: psql_inside(instance_id, port, "select count(*) from pg_stat_activity "
                                       "where application_name = 'pg_dump' and wait_event_type = 'Lock'") == "1",
                   timeout=60, message="pg_dump waiting for the table")

        subprocess.run(["ip", "link", "set", host_if, "down"], check=True)
        cut, cut_at = True, time.monotonic()
        locker.stdin.write("commit;\n")  # the dump goes on, and ends, during the cut
        locker.stdin.flush()

        error_at = finished_at = None
        while time.monotonic() < cut_at + CUT:
            if error_at is None and status(instance_id) == "ERROR":
                error_at = time.monotonic()
            if finished_at is None and any(r["fields"].get("state") == "COMPLETED"
                                           for r in waiting_reports(instance_id)):
                finished_at = time.monotonic()
            assert backup_row(backup_id).state != "COMPLETED", "reported COMPLETED during the cut"
            time.sleep(0.2)
        assert error_at is not None, "not ERROR within the cut"
        assert instance_row(instance_id).fault_kind == "heartbeat_expired"
        assert finished_at is not None, "the backup did not finish during the cut: " + \
            (Path(instance_dir(instance_id)) / "guest.log").read_text()[-3000:]
    finally:
        if cut:
            subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        locker.kill()
        locker.wait(timeout=10)
    restored_at = time.monotonic()

    active_at = wait_until(lambda: status(instance_id) == "ACTIVE" and time.monotonic(),
                           timeout=120, interval=0.1, message="ACTIVE after the link returned")
    reported_at = wait_until(lambda: backup_row(backup_id).state == "COMPLETED" and time.monotonic(),
                             timeout=120, interval=0.1, message="the backup reported COMPLETED")
    backup = backup_row(backup_id)
    stored = Path(guests.backup_root()) / backup_id
    assert backup.checksum == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert backup.location == stored.as_uri() and backup.backup_type == "pg_dump"
    wait_until(lambda: waiting_reports(instance_id) == [], timeout=30, message="the outbox emptied")
    # The guest takes commands again: its consumer is back too.
    again = system.ok("backup", "create", instance_id, "after", *WAIT)
    assert again["state"] == "COMPLETED"
    print(f"\nlink cut {CUT:.0f}s: ERROR {error_at - cut_at:.1f}s after the cut (expiry {EXPIRY:.0f}s); "
          f"ACTIVE {active_at - restored_at:.1f}s after the link returned; backup finished "
          f"{finished_at - cut_at:.1f}s into the cut, its COMPLETED report landed "
          f"{reported_at - restored_at:.1f}s after the link returned")
    delete_all(system, [instance_id])
