"""Who used the machine's CPU: from /proc, no library.

Categories: the conductors (each one's process tree: main process + pool children), the
bench's own processes (publisher/poller, raw consumer, listener), RabbitMQ (the whole node:
``beam.smp`` and its helpers, whatever vhost the work was for), PostgreSQL (backends of
the bench database that are not the bench's own, plus the cluster's background processes)
and everything else ("other": other engineers' tests, their PostgreSQL backends, ...).
"""

import os
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
RABBIT_COMMS = ("beam.smp", "erl_child_setup", "inet_gethost", "epmd")
CATEGORIES = ("conductors", "rabbitmq", "postgres", "bench", "other")


def process_cpu(pid: int, descendants: bool = True) -> float:
    """CPU seconds (user + system) of ``pid`` and, by default, its living descendants."""
    total, stack, seen = 0.0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            if descendants:
                for task in os.listdir(f"/proc/{current}/task"):
                    with open(f"/proc/{current}/task/{task}/children") as children:
                        stack.extend(int(c) for c in children.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


def tree_pids(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack.extend(int(c) for c in children.read().split())
        except OSError:
            pass
    return pids


def memory_kb(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) of one process, kB."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return found


def tree_rss_kb(pid: int) -> int:
    return sum(memory_kb(p).get("VmRSS", 0) for p in tree_pids(pid))


def schedstat(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of one thread."""
    try:
        with open(f"/proc/{pid}/task/{tid or pid}/schedstat") as stat:
            run, wait, _slices = stat.read().split()
        return int(run) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


def runnable() -> int:
    with open("/proc/stat") as stat:
        return next(int(line.split()[1]) for line in stat if line.startswith("procs_running"))


def listener_pid(port: int, comms: tuple[str, ...]) -> int | None:
    """The process (one of ``comms``) that listens on TCP ``port``: the shared RabbitMQ node
    or PostgreSQL cluster, not another one someone runs on another port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            pass
    candidates = [pid for comm in comms for pid in _comm_pids().get(comm, [])]
    for pid in sorted(candidates):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
        except OSError:
            continue
    return None


def _comm_pids() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as comm:
                    found.setdefault(comm.read().strip(), []).append(int(entry))
            except OSError:
                pass
    return found


class Accounting:
    """CPU per category between two ``delta()`` calls.

    ``pg_roles()`` returns {pid: "postgres" | "bench" | "other"} for the PostgreSQL
    processes pg_stat_activity lists (a process it does not list, like the postmaster, is
    PostgreSQL's own); see ``pg_roles_query``.
    """

    def __init__(self, conductor_pids: list[int], bench_pids: list[int], pg_roles,
                 threads: dict[str, int] | None = None, rabbit_pid: int | None = None,
                 postmaster_pid: int | None = None):
        self.conductor_pids, self.bench_pids, self.pg_roles = list(conductor_pids), list(bench_pids), pg_roles
        # The RabbitMQ node and the PostgreSQL cluster the bench uses (their process trees);
        # other nodes and clusters on the machine (tests' private ones) count as "other".
        self.rabbit_pid, self.postmaster_pid = rabbit_pid, postmaster_pid
        # Main threads to account for (the guests' consumer runs in a conductor's main thread).
        self.threads = threads if threads is not None else {
            f"conductor {k + 1}": pid for k, pid in enumerate(self.conductor_pids)}
        self.last = self._snapshot()

    def _snapshot(self) -> dict:
        comms = _comm_pids()
        return {
            "time": time.perf_counter(), "machine": machine_cpu(),
            "conductors": [process_cpu(pid) for pid in self.conductor_pids],
            "main": [process_cpu(pid, descendants=False) for pid in self.conductor_pids],
            "bench": sum(process_cpu(pid, descendants=False) for pid in self.bench_pids),
            "rabbitmq": ({pid: process_cpu(pid, False) for pid in tree_pids(self.rabbit_pid)} if self.rabbit_pid
                         else {pid: process_cpu(pid, False) for c in RABBIT_COMMS for pid in comms.get(c, [])}),
            "pg": ({pid: process_cpu(pid, False) for pid in tree_pids(self.postmaster_pid)} if self.postmaster_pid
                   else {pid: process_cpu(pid, False) for pid in comms.get("postgres", [])}),
            "pg_roles": self.pg_roles(),
            "threads": {label: schedstat(pid) for label, pid in self.threads.items()},
        }

    def delta(self) -> dict:
        """{"wall", "machine", *CATEGORIES (cores), "conductor_each", "conductor_main" (lists,
        cores), "cpu_s": {category: CPU seconds}}"""
        now, last = self._snapshot(), self.last
        self.last = now
        wall = now["time"] - last["time"]
        busy = now["machine"][0] - last["machine"][0]
        total = now["machine"][1] - last["machine"][1]
        cpu = {"conductors": sum(now["conductors"]) - sum(last["conductors"]),
               "bench": now["bench"] - last["bench"],
               "rabbitmq": sum(v - last["rabbitmq"].get(pid, 0.0) for pid, v in now["rabbitmq"].items()),
               "postgres": 0.0}
        pg_other = 0.0
        for pid, value in now["pg"].items():
            used = value - last["pg"].get(pid, 0.0)  # a new backend: all of its CPU is in the window
            role = now["pg_roles"].get(pid, last["pg_roles"].get(pid, "postgres"))
            if role == "bench":
                cpu["bench"] += used
            elif role == "other":
                pg_other += used
            else:
                cpu["postgres"] += used
        machine_busy = busy / total * CPUS * wall if total > 0 else float("nan")
        cpu["other"] = machine_busy - sum(cpu.values())
        result = {"wall": wall, "machine": machine_busy / wall if wall else float("nan"),
                  "cpu_s": cpu, "pg_other_dbs_cores": pg_other / wall if wall else float("nan")}
        for key, value in cpu.items():
            result[key] = value / wall if wall else float("nan")
        result["conductor_each"] = [(a - b) / wall for a, b in zip(now["conductors"], last["conductors"])]
        result["conductor_main"] = [(a - b) / wall for a, b in zip(now["main"], last["main"])]
        # Where a main thread's wall time went: on a CPU, runnable but waiting for one (the
        # machine is busy), or blocked (waiting for the broker or the database, or idle).
        result["threads"] = {}
        for label, (run, wait) in now["threads"].items():
            run0, wait0 = last["threads"].get(label, (run, wait))
            on_cpu, runq = (run - run0) / wall, (wait - wait0) / wall
            result["threads"][label] = {"cpu": on_cpu, "runqueue": runq, "blocked": max(0.0, 1 - on_cpu - runq)}
        return result


def pg_roles_query(cursor, database: str, bench_backends: set[int]) -> dict[int, str]:
    cursor.execute("SELECT pid, datname, backend_type FROM pg_stat_activity")
    roles = {}
    for pid, datname, backend_type in cursor.fetchall():
        if pid in bench_backends:
            roles[pid] = "bench"
        elif backend_type == "client backend" or datname is not None:
            roles[pid] = "postgres" if datname == database else "other"
        else:
            roles[pid] = "postgres"  # checkpointer, walwriter, autovacuum launcher, ...
    return roles


def threads_text(cores: dict) -> str:
    return "; ".join(f"{label} main thread: {t['cpu']:.0%} on a CPU, {t['runqueue']:.0%} waiting for a CPU, "
                     f"{t['blocked']:.0%} blocked" for label, t in cores.get("threads", {}).items())


def split_text(cores: dict) -> str:
    return (f"machine busy {cores['machine']:.2f}/{CPUS} cores = conductors {cores['conductors']:.2f} + "
            f"RabbitMQ {cores['rabbitmq']:.2f} + PostgreSQL {cores['postgres']:.2f} + bench "
            f"{cores['bench']:.2f} + other {cores['other']:.2f}")
