"""RabbitMQ's cost of a fleet's guests, per instance: what sizing the broker for a fleet needs.

On RabbitMQ every instance's guest holds a broker user of its own, a durable command queue
and two connections: the agent's, consuming that queue, and the reporter's, publishing its
heartbeats with publisher confirms; both with the AMQP heartbeat timeout guests use. This
bench makes each guest the product's way, on a private RabbitMQ node with the management
plugin on (production's setup: the taskmanager makes guests' users through it):

- its user, permissions and limits through ``workers.taskmanager.broker_users``, its queues
  declared by ``workers.taskmanager.guests.declare_queues``, its configuration by
  ``guests.config_for``;
- its reporter is the guest agent's own ``ConductorClient``; its agent connection has the
  agent's settings and consumer (``broker_heartbeat``, ``command_queue``, prefetch 1); both
  answer AMQP heartbeats as the agent's loop does (``heartbeat_check``).

At each fleet size it measures the node: memory (RabbitMQ's own breakdown), Erlang
processes and sockets per guest; how fast guests are provisioned and connected (after a
broker restart the whole fleet reconnects); the CPU of the connected fleet while silent
(AMQP heartbeats, the management plugin's statistics) and while every guest reports once
per interval. Every heartbeat sent is confirmed by the broker and counted at the conductor's
queue. Then what that means for ``--fleet-size`` instances.
"""

import argparse
import json
import os
import resource
import secrets
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from kombu import Connection, Consumer  # noqa: E402

from bench.hb.cpu import CPUS, machine_cpu, process_cpu  # noqa: E402
from dbaas import settings  # noqa: E402
from dbaas.queues import queue  # noqa: E402
from tests.support.private_rabbit import RabbitNode  # noqa: E402
from workers.guestagent.api import command_queue  # noqa: E402
from workers.guestagent.client import ConductorClient, broker_heartbeat  # noqa: E402
from workers.taskmanager import guests  # noqa: E402
from workers.taskmanager.broker_users import BrokerUsers  # noqa: E402

SERVICE_EVERY = 1.0  # s between two answers to AMQP heartbeats, as the agent's loop


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Node(RabbitNode):
    """A private node with the management plugin and the bench's emulator flags
    (``--erl-args``), measured through its management API, rabbitmqctl and /proc."""

    def __init__(self, erl_args: str):
        super().__init__(management=True)
        self.erl_args = erl_args

    def _env(self) -> dict:
        env = super()._env()
        env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] += f" {self.erl_args}"
        return env

    def get(self, path: str) -> dict:
        response = requests.get(f"{self.management_url}api/{path}", auth=("guest", "guest"), timeout=30)
        response.raise_for_status()
        return response.json()

    def cpu(self) -> float:
        return process_cpu(self.beam_pid())

    def limits(self) -> dict:
        status = json.loads(self.ctl("status", "--formatter", "json"))
        return {"processes": status["processes"]["limit"],
                "sockets": status["file_descriptors"]["sockets_limit"],
                "fds": status["file_descriptors"]["total_limit"]}

    def sample(self) -> dict:
        """Now (the management API's node statistics lag by seconds): RSS and Erlang's
        memory by RabbitMQ's breakdown (bytes), Erlang processes, open sockets."""
        memory = self.get(f"nodes/{self.node}/memory")["memory"]
        processes = int(self.ctl("eval", "erlang:system_info(process_count).").strip())
        fd_dir = Path(f"/proc/{self.beam_pid()}/fd")
        sockets = sum(1 for fd in fd_dir.iterdir() if os.readlink(fd).startswith("socket:"))
        return {"rss": memory["total"]["rss"], "erlang": memory["total"]["erlang"],
                "parts": {k: v for k, v in memory.items() if isinstance(v, int)},
                "processes": processes, "sockets": sockets}


def drain(connection) -> None:
    """Read everything the broker has sent on ``connection``, without waiting."""
    while True:
        try:
            connection.drain_events(timeout=0)
        except socket.timeout:
            return


class Guest:
    """One instance's guest, as the broker sees it."""

    def __init__(self, config):
        self.config = config
        self.reporter = ConductorClient(config)
        self.agent = Connection(config.broker_url, heartbeat=broker_heartbeat(config))
        self.consumer = None

    def connect(self) -> None:
        self.agent.ensure_connection(max_retries=3)
        self.consumer = Consumer(self.agent.default_channel, prefetch_count=1,
                                 queues=[command_queue(self.config.instance_id, declare=False)],
                                 on_message=lambda message: message.ack())
        self.consumer.consume()
        self.report()  # what a starting guest does first; it opens the reporter's connection

    def report(self) -> None:
        self.reporter.heartbeat(service_status="running")

    def service(self) -> None:
        """Read what the broker sent (its heartbeats) and send ours when due."""
        for connection in (self.agent, self.reporter.connection):
            drain(connection)
            connection.heartbeat_check()

    def close(self) -> None:
        for connection in (self.agent, self.reporter.connection):
            try:
                connection.release()
            except Exception:  # a connection the node already closed
                pass


class Fleet:
    def __init__(self, node: Node, opts):
        self.node, self.opts = node, opts
        self.guests: list[Guest] = []
        self.received = 0
        config = settings.get()
        # The conductor's queue, drained here without a conductor: the heartbeats' own
        # cost (accepted, persisted, delivered) is the heartbeat bench's subject; here it
        # is only checked that every confirmed one arrived.
        self.sink = Connection(config.broker_url)
        declared = queue(config.conductor_queue, config.queue_type)(self.sink.default_channel)
        declared.declare()
        self.sink_consumer = Consumer(self.sink.default_channel, queues=[declared], no_ack=True,
                                      on_message=self._count)
        self.sink_consumer.consume()

    def _count(self, _message) -> None:
        self.received += 1

    def provision(self, count: int) -> list:
        """``count`` guests made as the taskmanager makes them; their configurations."""
        users = BrokerUsers()

        def make(_):
            instance_id = str(uuid.uuid4())
            url = users.ensure(instance_id, 1)
            guests.declare_queues(instance_id)
            return guests.config_for(instance_id, 1, "sqlite", url)

        with ThreadPoolExecutor(self.opts.threads) as pool:
            return list(pool.map(make, range(count)))

    def connect(self, configs: list) -> None:
        new = [Guest(config) for config in configs]
        with ThreadPoolExecutor(self.opts.threads) as pool:
            list(pool.map(Guest.connect, new))
        self.guests += new

    def service(self) -> None:
        for guest in self.guests:
            guest.service()
        drain(self.sink)

    def run(self, seconds: float, interval: float | None) -> int:
        """Keep the fleet's connections alive for ``seconds``; with ``interval``, each guest
        also reports once per interval, spread evenly. Returns heartbeats sent."""
        began = time.monotonic()
        end, next_service, sent = began + seconds, began, 0
        count = len(self.guests)
        while (now := time.monotonic()) < end:
            if interval:
                due = int((now - began) / interval * count)
                while sent < due:
                    self.guests[sent % count].report()
                    sent += 1
            if now >= next_service:
                self.service()
                next_service += SERVICE_EVERY
            drain(self.sink)
            time.sleep(0.002)
        return sent

    def close(self) -> None:
        for guest in self.guests:
            guest.close()
        self.sink.release()


def measure(fleet: Fleet, seconds: float, interval: float | None) -> dict:
    node = fleet.node
    cpu0, (busy0, total0), t0 = node.cpu(), machine_cpu(), time.monotonic()
    received0 = fleet.received
    sent = fleet.run(seconds, interval)
    wall = time.monotonic() - t0
    cpu1, (busy1, total1) = node.cpu(), machine_cpu()
    deadline = time.monotonic() + 10
    while fleet.received - received0 < sent and time.monotonic() < deadline:
        drain(fleet.sink)
        time.sleep(0.01)
    return {"seconds": wall, "rabbitmq_cores": (cpu1 - cpu0) / wall,
            "machine_cores": (busy1 - busy0) / (total1 - total0) * CPUS,
            "sent": sent, "received": fleet.received - received0}


def per_guest(before: dict, after: dict, count: int) -> dict:
    return {"rss": (after["rss"] - before["rss"]) / count,
            "erlang": (after["erlang"] - before["erlang"]) / count,
            "parts": {k: (v - before["parts"].get(k, 0)) / count for k, v in after["parts"].items()},
            "processes": (after["processes"] - before["processes"]) / count,
            "sockets": (after["sockets"] - before["sockets"]) / count}


def per_heartbeat(r: dict) -> float:
    """Node CPU seconds per heartbeat: the reporting window above the silent one."""
    rate = r["reporting"]["sent"] / r["reporting"]["seconds"]
    return (r["reporting"]["rabbitmq_cores"] - r["silent"]["rabbitmq_cores"]) / max(rate, 1)


def per_second(window: dict, idle: dict, count: int) -> str:
    return f"{1e6 * (window['rabbitmq_cores'] - idle['rabbitmq_cores']) / count:.1f} µs/s"


def kb(value: float) -> str:
    return f"{value / 1024:,.1f} KB"


def memory_text(cost: dict) -> str:
    """RSS, Erlang's own total, and the breakdown's largest parts (RSS counts what the OS
    gave the node; the breakdown's ``reserved_unallocated`` is RSS not in Erlang's use)."""
    big = sorted(((v, k) for k, v in cost["parts"].items()
                  if k != "reserved_unallocated" and v >= 0.05 * max(cost["erlang"], 1)), reverse=True)
    return (f"RSS {kb(cost['rss'])} (Erlang {kb(cost['erlang'])}: "
            + ", ".join(f"{k} {kb(v)}" for v, k in big) + f"), {cost['processes']:.1f} Erlang processes")


def run(opts) -> dict:
    sizes = sorted({int(s) for s in opts.guests.split(",")})
    node = Node(opts.erl_args)
    with open(node.dir / "rabbitmq.conf", "a") as conf:
        conf.writelines(f"{line}\n" for line in opts.node_config)
    results: dict = {"sizes": {}, "queue_type": opts.queue_type, "interval": opts.interval,
                     "node_config": opts.node_config, "erl_args": opts.erl_args}
    fleet = None
    try:
        node.start()
        os.environ.update({
            "DBAAS_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{node.port}//",
            "DBAAS_BROKER_ADMIN_URL": f"http://guest:guest@127.0.0.1:{node.management_port}/",
            "DBAAS_SERVICE_KEY": secrets.token_hex(32),
            "DBAAS_VAR_DIR": str(node.dir / "dbaas"),
            "DBAAS_QUEUE_TYPE": opts.queue_type,
            "DBAAS_GUEST_HEARTBEAT_INTERVAL": str(opts.interval),
        })
        log(f"private RabbitMQ node {node.node} (management on) started in {node.start_seconds:.1f}s")
        fleet = Fleet(node, opts)
        limits = results["limits"] = node.limits()
        if 2 * sizes[-1] > 0.95 * limits["sockets"]:
            raise SystemExit(f"{sizes[-1]} guests need {2 * sizes[-1]} sockets; the node allows "
                             f"{limits['sockets']} (raise `ulimit -n` of this shell)")
        time.sleep(opts.settle)
        empty = results["empty"] = node.sample()
        idle = results["idle"] = measure(fleet, opts.window, None)
        log(f"empty node: RSS {empty['rss'] / 2**20:.0f} MB, {empty['processes']} Erlang processes, "
            f"{idle['rabbitmq_cores']:.3f} cores; limits: {limits['processes']:,} processes, "
            f"{limits['sockets']:,} sockets")
        made = 0
        for size in sizes:
            added = size - made
            cpu0, t0 = node.cpu(), time.monotonic()
            configs = fleet.provision(added)
            provision_s, provision_cpu = time.monotonic() - t0, node.cpu() - cpu0
            time.sleep(opts.settle)
            provisioned = node.sample()
            unconnected = measure(fleet, opts.window, None)
            cpu0, t0 = node.cpu(), time.monotonic()
            fleet.connect(configs)
            connect_s, connect_cpu = time.monotonic() - t0, node.cpu() - cpu0
            made = size
            log(f"{size} guests: {added} provisioned in {provision_s:.1f}s, connected "
                f"({2 * added} connections) in {connect_s:.1f}s")
            fleet.run(opts.settle, None)
            connected = node.sample()
            silent = measure(fleet, opts.window, None)
            reporting = measure(fleet, opts.window, opts.interval)
            log(f"{size} guests: silent {silent['rabbitmq_cores']:.3f} cores, reporting "
                f"{reporting['rabbitmq_cores']:.3f} cores; heartbeats sent {reporting['sent']}, "
                f"received {reporting['received']}")
            results["sizes"][size] = {
                "added": added, "provision_s": provision_s, "provision_cpu_s": provision_cpu,
                "connect_s": connect_s, "connect_cpu_s": connect_cpu,
                "provisioned": provisioned, "unconnected": unconnected, "connected": connected,
                "silent": silent, "reporting": reporting}
    finally:
        if fleet is not None:
            fleet.close()
        node.cleanup()
    return results


def report(results: dict, opts) -> bool:
    empty, idle, limits, sizes = results["empty"], results["idle"], results["limits"], results["sizes"]
    ok = True
    print("=" * 100)
    print(f"RabbitMQ's cost of a fleet's guests ({results['queue_type']} command queues, heartbeat "
          f"every {results['interval']:g} s; private node, management plugin on; "
          f"{CPUS} CPUs here)" + "".join(f"; {line}" for line in results["node_config"])
          + (f"; emulator flags {results['erl_args']}" if results["erl_args"] else ""))
    print(f"empty node: RSS {empty['rss'] / 2**20:.0f} MB, {empty['processes']} Erlang processes, "
          f"{idle['rabbitmq_cores']:.3f} cores idle")
    print("=" * 100)
    before, before_silent = empty, idle
    for size, r in sizes.items():
        added = r["added"]
        provisioned = per_guest(before, r["provisioned"], added)
        connections = per_guest(r["provisioned"], r["connected"], added)
        whole = per_guest(empty, r["connected"], size)
        silent, reporting = r["silent"], r["reporting"]
        rate = reporting["sent"] / reporting["seconds"]
        lost = reporting["sent"] - reporting["received"]
        ok = ok and lost == 0 and connections["sockets"] >= 1.9
        print(f"{size:,} guests ({2 * size:,} connections; {size:,} users, command queues):")
        print(f"    per guest: {memory_text(whole)}, {whole['sockets']:.2f} sockets")
        print(f"      of which its user and queue (the {added:,} added last): {memory_text(provisioned)}")
        print(f"      and its two connections: {memory_text(connections)}")
        print(f"    provisioning ({opts.threads} threads; 4 management API calls and a queue declaration "
              f"each): {added / r['provision_s']:,.0f} guests/s; RabbitMQ {1e3 * r['provision_cpu_s'] / added:.2f} ms "
              f"CPU per guest")
        print(f"    connecting ({opts.threads} threads; both connections, the agent's consumer, the first "
              f"heartbeat): {added / r['connect_s']:,.0f} guests/s; RabbitMQ "
              f"{1e3 * r['connect_cpu_s'] / added:.2f} ms CPU per guest")
        print(f"    CPU while silent (statistics, timers, AMQP heartbeats), per guest: its user and queue "
              f"{per_second(r['unconnected'], before_silent, added)}, its two connections "
              f"{per_second(silent, r['unconnected'], added)}; the whole fleet "
              f"{per_second(silent, idle, size)} above the empty node (node {silent['rabbitmq_cores']:.3f} cores)")
        print(f"    reporting ({rate:,.0f} heartbeats/s): RabbitMQ {reporting['rabbitmq_cores']:.3f} cores, "
              f"{1e6 * per_heartbeat(r):.0f} µs per "
              f"heartbeat above silence (its own connection, persistent, confirmed; delivered without "
              f"ack; machine {reporting['machine_cores']:.2f} cores busy); sent {reporting['sent']}, "
              f"received {reporting['received']}: "
              f"{'OK' if lost == 0 else f'{lost} MISSING'}")
        before, before_silent = r["connected"], silent
    largest = max(sizes)
    r = sizes[largest]
    whole = per_guest(empty, r["connected"], largest)
    buffers = whole["parts"].get("binary", 0) / 2
    if 2 * buffers > 0.5 * whole["erlang"]:
        print(f"    (Erlang's `binary` counts each connection's socket buffer at its full size, "
              f"{kb(buffers)} here, sized by the kernel's TCP buffers; RSS counts the pages in use. "
              f"Smaller buffers for a large fleet: --node-config 'tcp_listen_options.recbuf = 32768', "
              f"and sndbuf)")
    n, rate = opts.fleet_size, opts.fleet_size / opts.interval
    rss = empty["rss"] + whole["rss"] * n
    processes = empty["processes"] + whole["processes"] * n
    silent_cores = idle["rabbitmq_cores"] + (r["silent"]["rabbitmq_cores"] - idle["rabbitmq_cores"]) / largest * n
    per_beat = per_heartbeat(r)
    connect_cpu = r["connect_cpu_s"] / r["added"]
    print(f"FOR {n:,} INSTANCES (linear from {largest:,} guests; {2 * n:,} connections, {n:,} users "
          f"and queues):")
    print(f"    memory: RSS {rss / 2**30:.1f} GiB; RabbitMQ blocks every publisher at its memory high "
          f"watermark (0.4 of RAM by default): {rss / 0.4 / 2**30:.0f} GiB of RAM, or the fleet "
          f"spread over a cluster's nodes")
    print(f"    Erlang processes: {processes:,.0f}, against this node's limit of {limits['processes']:,}"
          + (" (raise it: RABBITMQ_MAX_NUMBER_OF_PROCESSES)" if processes > 0.8 * limits["processes"] else ""))
    print(f"    sockets: {2 * n:,} (this node's limit here: {limits['sockets']:,}; it follows the "
          f"file descriptor limit the node starts with)")
    print(f"    CPU: connected and silent {silent_cores:.2f} cores; reporting every {opts.interval:g} s "
          f"({rate:,.0f}/s) adds {per_beat * rate:.2f} (the conductor's side of the queue: "
          f"bench/heartbeats.py)")
    print(f"    the whole fleet reconnecting (a broker restart): {n * connect_cpu:,.0f} node CPU-seconds, "
          f"{n * connect_cpu / 60:.1f} min on one core")
    print(f"    provisioning the fleet at the rate measured here: "
          f"{n / (r['added'] / r['provision_s']) / 60:.0f} min")
    print(f"CORRECTNESS: {'OK' if ok else 'FAILED'} (every guest connected twice; every confirmed "
          f"heartbeat reached the conductor's queue)")
    return ok


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guests", default="500,1000", help="fleet sizes measured, cumulative")
    parser.add_argument("--queue-type", default="classic", choices=("classic", "quorum"),
                        help="DBAAS_QUEUE_TYPE of the guests' command queues")
    parser.add_argument("--interval", type=float, default=10.0, help="guests' heartbeat interval (s)")
    parser.add_argument("--window", type=float, default=30.0,
                        help="seconds of each measurement (>= 2 AMQP heartbeat periods)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before a memory sample")
    parser.add_argument("--node-config", action="append", default=[], metavar="LINE",
                        help="a rabbitmq.conf line for the node, e.g. 'collect_statistics_interval = 60000'")
    parser.add_argument("--erl-args", default="", metavar="FLAGS",
                        help="Erlang emulator flags for the node, e.g. '+sbwt none' (no scheduler busy-wait)")
    parser.add_argument("--threads", type=int, default=8, help="provisioning and connecting threads")
    parser.add_argument("--fleet-size", type=int, default=100_000, help="instances of the sizing lines")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    # Two sockets per guest here, and the node inherits this process's limit.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = run(opts)
    ok = report(results, opts)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
