"""The ``netns`` compute driver: the local driver's guest processes, each in a Linux network
namespace of its own that reaches the broker and nothing else.

Per instance (``<id12>`` is the first 12 hex digits of its id):

- a network namespace ``dbaas-<instance id>`` holding only ``lo`` and the guest's end of a
  veth pair, ``dbg<id12>``; the host's end is ``dbh<id12>`` (15 characters, the kernel's
  limit). IPv6 is off on both ends, so no link-local address exists to talk over;
- a /30 of ``DBAAS_NETNS_SUBNET``: ``.1`` on the host's end, ``.2`` on the guest's. The
  namespace has no other route (no default route): anything but that /30 is unreachable;
- the broker, through the host's end: a guest connects to ``.1`` at the broker's port and
  an nftables DNAT rule on the host sends the connection on to where the broker listens.
  RabbitMQ here listens on 127.0.0.1 only, and the kernel refuses to route a packet that
  came in on an interface to 127.0.0.0/8 unless that interface allows it:
  ``net.ipv4.conf.dbh<id12>.route_localnet=1``, set on our own veth only, and gone with it.
  DNAT rather than a forwarding process: nothing of ours has to run, be supervised or be
  restarted for the guest to reach the broker, connections keep their source address
  (RabbitMQ sees which namespace connects) and a cut link behaves like a cut link.
  A broker elsewhere is refused: reaching it would need forwarding, and forwarding is
  a host-wide switch this driver leaves alone;
- nftables, in a table of its own on the host, ``inet dbaas_netns_<id12>`` (its chains see
  only packets of ``dbh<id12>``): the DNAT rule; input from the veth accepted only for the
  DNATed broker connection and replies to connections the host opened, everything else
  from it dropped (the host's other services, 127.0.0.1:5432 among them, are not
  reachable through it); nothing forwarded from or to it. And inside the namespace, table
  ``inet dbaas_guest``: out only to loopback and to ``.1`` at the broker's port, in only
  from loopback and from ``.1`` to the datastore's port (clients on the host connect to
  ``.2``), plus replies. The two tables fence the guest twice: a rule lost on one side
  still leaves the other.

``allocate_endpoint`` answers ``(.2, port)``: the datastore listens there (as well as on the
namespace's 127.0.0.1) and ``instance show`` tells clients where to connect.
``broker_endpoint`` answers ``(.1, the broker's port)``, which goes into the guest's broker
URL. Either call creates the instance's network if it does not exist yet, so that its /30
is taken in the kernel at once: another taskmanager (another var dir) allocating at the
same time sees it. Allocation and creation hold a host-wide lock; every step is
idempotent and runs under the instance's lock (the local driver's flock on its directory),
so a redelivered request redoes what is missing and nothing twice.

The guest runs as ``ip netns exec dbaas-<id> <guest command>``: ``ip`` enters the namespace
and execs the guest, so the pid recorded is the guest's. ``destroy`` stops the guest as the
local driver does, then every process left in the namespace, then deletes the namespace,
the veth pair (and with it its sysctls) and the host table, before the directory.

What it isolates and what not: the network only. The guest still runs as the
taskmanager's user (root, which PostgreSQL's programs need to switch to ``postgres``), on
the host's file system, with the host's process table. An agent that turns hostile as root
can leave its namespace (``setns``) or rewrite its rules; the host-side table is out of its
reach only as long as it is not root on the host. Containers or VMs isolate more.
Needs root, iproute2 (``ip``), nftables (``nft``) and a kernel with veth, netns and
nf_tables.
"""

import fcntl
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from dbaas import settings
from dbaas.files import write_atomically
from workers.taskmanager.broker_users import is_rabbitmq
from workers.taskmanager.compute.base import SpawnError
from workers.taskmanager.compute.local import (ENDPOINT_FILE, KILL_WAIT, LocalDriver, _kill,
                                               _locked, instance_dir, instances_root)

log = logging.getLogger(__name__)

NETWORK_FILE = "network.json"
HOST_LOCK = "/run/lock/dbaas-netns.lock"
GUEST_TABLE = "dbaas_guest"
PREFIX = 30
COMMAND_TIMEOUT = 30


@dataclass(frozen=True)
class Names:
    namespace: str
    host_if: str
    guest_if: str
    table: str

    @classmethod
    def of(cls, instance_id: str) -> "Names":
        instance_dir(instance_id)  # refuses anything but a canonical UUID
        short = instance_id.replace("-", "")[:12]
        return cls(f"dbaas-{instance_id}", f"dbh{short}", f"dbg{short}", f"dbaas_netns_{short}")


@dataclass(frozen=True)
class Network:
    subnet: ipaddress.IPv4Network

    @property
    def host_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def guest_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 2


class NetnsDriver(LocalDriver):
    def __init__(self, *args, subnet: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        config = settings.get()
        try:
            self.pool = ipaddress.IPv4Network(subnet or config.netns_subnet)
        except ValueError as exc:
            raise ValueError(f"DBAAS_NETNS_SUBNET: {exc}") from None
        if self.pool.prefixlen > PREFIX:
            raise ValueError(f"DBAAS_NETNS_SUBNET={self.pool} holds no /{PREFIX}")
        self.broker_url = config.broker_url

    # --- the ComputeDriver interface

    def broker_endpoint(self, instance_id: str) -> tuple[str, int] | None:
        target = self._broker_target()
        if target is None:
            return None  # the embedded broker is a directory: no network involved
        return str(self.network(instance_id).host_ip), target[1]

    def allocate_endpoint(self, instance_id: str) -> tuple[str, int]:
        _, port = super().allocate_endpoint(instance_id)
        return str(self.network(instance_id).guest_ip), port

    def network(self, instance_id: str) -> Network:
        """The instance's network, made (or completed) now if it is not whole."""
        directory = instance_dir(instance_id)
        os.makedirs(directory, exist_ok=True)
        with _locked(directory):
            return self._ensure_network(instance_id, directory)

    # --- hooks of the local driver (called under the instance's lock)

    def _launch_command(self, instance_id: str, config_file: str) -> list[str]:
        self._ensure_network(instance_id, instance_dir(instance_id))
        return [_program("ip"), "netns", "exec", Names.of(instance_id).namespace,
                *super()._launch_command(instance_id, config_file)]

    def _release(self, instance_id: str) -> None:
        remove_network(instance_id, self.stop_timeout)

    # --- the network

    def _ensure_network(self, instance_id: str, directory: str) -> Network:
        if os.geteuid() != 0:
            raise SpawnError("the netns compute driver needs root")
        names = Names.of(instance_id)
        record = os.path.join(directory, NETWORK_FILE)
        with _host_lock():
            if os.path.exists(record):
                with open(record) as source:
                    network = Network(ipaddress.IPv4Network(json.load(source)["subnet"]))
            else:
                network = Network(self._free_subnet())
                write_atomically(record, json.dumps({"subnet": str(network.subnet)}))
            try:
                self._build(names, network, self._datastore_port(directory))
            except subprocess.CalledProcessError as exc:
                raise SpawnError(f"cannot build the network of {instance_id}: "
                                 f"{' '.join(exc.cmd)}: {(exc.stderr or '').strip()[-500:]}") from None
        return network

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """The first /30 of the pool that overlaps no address or route of the host (ours
        included: their /30s are on our veths) nor any recorded in this var dir."""
        taken = [*_host_networks(), *_recorded_subnets()]
        for candidate in self.pool.subnets(new_prefix=PREFIX):
            if not any(candidate.overlaps(used) for used in taken):
                return candidate
        raise SpawnError(f"no free /{PREFIX} left in DBAAS_NETNS_SUBNET={self.pool}")

    def _broker_target(self) -> tuple[str, int] | None:
        """(IPv4 address, port) the broker listens on, on this host; None for the embedded one."""
        if not is_rabbitmq(self.broker_url):
            return None
        parts = urlsplit(self.broker_url.split(";")[0])
        port = parts.port or 5672
        try:
            address = socket.getaddrinfo(parts.hostname or "127.0.0.1", port, socket.AF_INET,
                                         socket.SOCK_STREAM)[0][4][0]
        except OSError as exc:
            raise SpawnError(f"cannot resolve the broker's host {parts.hostname!r}: {exc}") from None
        if not _is_local(address):
            raise SpawnError(f"the netns driver reaches only a broker on this host; "
                             f"{parts.hostname} ({address}) is not")
        return address, port

    @staticmethod
    def _datastore_port(directory: str) -> int | None:
        try:
            with open(os.path.join(directory, ENDPOINT_FILE)) as recorded:
                return int(recorded.read())
        except FileNotFoundError:
            return None

    def _build(self, names: Names, network: Network, datastore_port: int | None) -> None:
        """Whatever of the instance's network is missing, made; the rules rewritten whole.
        The rules come first, so the links are never up unfenced."""
        broker = self._broker_target()
        prefix = f"/{network.subnet.prefixlen}"
        if not os.path.exists(f"/run/netns/{names.namespace}"):
            _run("ip", "netns", "add", names.namespace)
        if not _link_exists(names.host_if):
            _run("ip", "link", "add", names.host_if, "type", "veth", "peer", "name",
                 names.guest_if, "netns", names.namespace)
        _write_sysctl(f"net/ipv6/conf/{names.host_if}/disable_ipv6", "1")
        if broker and ipaddress.IPv4Address(broker[0]).is_loopback:
            _write_sysctl(f"net/ipv4/conf/{names.host_if}/route_localnet", "1")
        _run("nft", "-f", "-", stdin=host_rules(names, network, broker))
        inside = ("ip", "netns", "exec", names.namespace)
        _run(*inside, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1")
        _run(*inside, "nft", "-f", "-", stdin=guest_rules(names, network, broker, datastore_port))
        _run("ip", "addr", "replace", f"{network.host_ip}{prefix}", "dev", names.host_if)
        _run("ip", "link", "set", names.host_if, "up")
        _run("ip", "-n", names.namespace, "link", "set", "lo", "up")
        _run("ip", "-n", names.namespace, "addr", "replace", f"{network.guest_ip}{prefix}",
             "dev", names.guest_if)
        _run("ip", "-n", names.namespace, "link", "set", names.guest_if, "up")


def host_rules(names: Names, network: Network, broker: tuple[str, int] | None) -> str:
    """The host's table for one instance: every rule names the instance's own veth."""
    dnat = accept_broker = ""
    if broker:
        address, port = broker
        dnat = (f'iifname "{names.host_if}" ip saddr {network.guest_ip} ip daddr {network.host_ip} '
                f'tcp dport {port} dnat ip to {address}:{port}')
        accept_broker = (f'iifname "{names.host_if}" ip saddr {network.guest_ip} ip daddr {address} '
                         f'tcp dport {port} ct status dnat accept')
    # "table; delete table; table {…}" in one transaction: replaced whole, atomically, and
    # no error whether it existed or not.
    return f"""
table inet {names.table}
delete table inet {names.table}
table inet {names.table} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {dnat}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{names.host_if}" ct state established,related accept
        {accept_broker}
        iifname "{names.host_if}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{names.host_if}" drop
        oifname "{names.host_if}" drop
    }}
}}
"""


def guest_rules(names: Names, network: Network, broker: tuple[str, int] | None,
                datastore_port: int | None) -> str:
    """The namespace's own table: loopback, the broker, and clients of its datastore."""
    out_broker = (f'oifname "{names.guest_if}" ip daddr {network.host_ip} tcp dport {broker[1]} '
                  f'ct state new accept') if broker else ""
    in_clients = (f'iifname "{names.guest_if}" ip saddr {network.host_ip} ip daddr {network.guest_ip} '
                  f'tcp dport {datastore_port} ct state new accept') if datastore_port else ""
    return f"""
table inet {GUEST_TABLE}
delete table inet {GUEST_TABLE}
table inet {GUEST_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        {in_clients}
    }}
    chain output {{
        type filter hook output priority filter; policy drop;
        oif "lo" accept
        ct state established,related accept
        {out_broker}
    }}
}}
"""


def remove_network(instance_id: str, grace: float = 10.0) -> None:
    """Every process in the instance's namespace stopped, then the namespace, the veth pair
    (its sysctls go with it) and the host's table deleted. Nothing if they are gone."""
    names = Names.of(instance_id)
    if os.path.exists(f"/run/netns/{names.namespace}"):
        def find() -> list[int]:
            result = _run("ip", "netns", "pids", names.namespace, check=False)
            return [int(pid) for pid in result.stdout.split()]
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
            if not find():
                break
            for pid in find():
                _kill(pid, sig)
            deadline = time.monotonic() + wait
            while find() and time.monotonic() < deadline:
                time.sleep(0.05)
        _run("ip", "netns", "delete", names.namespace, check=False)
    if _link_exists(names.host_if):
        _run("ip", "link", "delete", names.host_if, check=False)
    _run("nft", "-f", "-", stdin=f"table inet {names.table}\ndelete table inet {names.table}\n")
    leftovers = leftovers_of(instance_id)
    if leftovers:
        raise RuntimeError(f"the network of {instance_id} is not gone: {leftovers}")


def leftovers_of(instance_id: str) -> list[str]:
    """What remains of the instance's network: namespace, veth, host table."""
    names = Names.of(instance_id)
    found = []
    if os.path.exists(f"/run/netns/{names.namespace}"):
        found.append(f"namespace {names.namespace}")
    for link in (names.host_if, names.guest_if):
        if _link_exists(link):
            found.append(f"link {link}")
    if _run("nft", "list", "table", "inet", names.table, check=False).returncode == 0:
        found.append(f"nft table inet {names.table}")
    return found


# --- helpers

def _program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise SpawnError(f"the netns compute driver needs `{name}` "
                         f"({'iproute2' if name == 'ip' else 'nftables'})")
    return path


def _run(*command: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    resolved = [_program(command[0]), *command[1:]]
    if command[:2] == ("ip", "netns") and command[2:3] == ("exec",):
        resolved[4] = _program(command[4])
    return subprocess.run(resolved, input=stdin, capture_output=True, text=True, check=check,
                          timeout=COMMAND_TIMEOUT)


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _write_sysctl(key: str, value: str) -> None:
    if key.startswith("net/ipv6/") and not os.path.exists("/proc/sys/net/ipv6"):
        return  # a kernel without IPv6 has nothing to turn off
    with open(f"/proc/sys/{key}", "w") as out:
        out.write(value)


def _is_local(address: str) -> bool:
    """Whether ``address`` is one of this host's (binding to it succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address in or a route to (but the default route)."""
    found = []
    for entry in json.loads(_run("ip", "-j", "-4", "addr", "show").stdout or "[]"):
        for info in entry.get("addr_info", []):
            found.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        destination = route.get("dst", "")
        if destination in ("", "default") or route.get("type") in ("local", "broadcast"):
            continue
        try:
            found.append(ipaddress.IPv4Network(destination, strict=False))
        except ValueError:
            continue
    return found


def _recorded_subnets() -> list[ipaddress.IPv4Network]:
    found = []
    root = instances_root()
    for name in os.listdir(root) if os.path.isdir(root) else ():
        try:
            with open(os.path.join(root, name, NETWORK_FILE)) as source:
                found.append(ipaddress.IPv4Network(json.load(source)["subnet"]))
        except (OSError, ValueError, KeyError):
            continue
    return found


@contextmanager
def _host_lock():
    """One allocation or build at a time on this host, whatever the var dir."""
    os.makedirs(os.path.dirname(HOST_LOCK), exist_ok=True)
    fd = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
