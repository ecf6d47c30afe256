"""What the conductor exports for Prometheus: guests' traffic (which Flower never sees —
heartbeats are not Celery task runs), sweeps, instances by status and queue depths.

Served over HTTP by each conductor's main process (``DBAAS_METRICS_PORT``, ``/metrics``).
Its pool processes (calls, casts, sweeps) count too: prometheus_client's multiprocess mode,
with one directory per conductor under ``var/metrics/``: a worker calls
``use_private_directory`` before any of them is made. In any other process (tests) metrics
stay in-process. Instances by status and queue depths are read when scraped.
"""

import functools
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

from kombu import Connection
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from dbaas import db, settings, wire
from workers.conductor import instances

log = logging.getLogger(__name__)

SCRAPE_CACHE_SECONDS = 5.0


def use_private_directory() -> None:
    """var/metrics/conductor-<pid>, empty, for this worker and its pool; those of
    conductors no longer running go."""
    root = Path(settings.get().var_dir) / "metrics"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("conductor-*"):
        pid = old.name.partition("-")[2]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(old, ignore_errors=True)
    directory = root / f"conductor-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    # The guests' queue is served by the main process alone, which also serves the
    # metrics: its metrics stay in memory (a file-backed value costs ~3 µs per update, on
    # the hottest path). They are made before the switch below.
    _guest_metrics()
    # prometheus_client picks its value class when first imported, and the `celery`
    # command has imported it already (Flower's command plugin): metrics made from now on
    # (the pool processes': see _pool_metrics) must use the multiprocess one.
    values.ValueClass = values.MultiProcessValue()


REFUSAL_REASONS = ("malformed", "too_large", "headers", "encoding", "depth", "unauthenticated",
                   "not_allowed", "user_id", "revoked", "invalid", "failed")


@functools.cache
def _guest_metrics() -> SimpleNamespace:
    """Counted by the main process (the guests' queue); not registered with the default
    registry: ``serve`` registers them beside the pool processes' files. Every labelled
    series is made here, at zero: prometheus_client picks a series' value class when the
    series is first used, and one made after the switch to files created its file while
    a scrape could read it empty (a scrape failed with a 500)."""
    metrics = SimpleNamespace(
        guest_messages=Counter(
            "dbaas_guest_messages_total",
            "Guests' messages by task and outcome: applied, or stale (not newer than one "
            "applied before: discarded)", ["task", "outcome"], registry=None),
        refusals=Counter(
            "dbaas_guest_messages_refused_total",
            "Guests' messages refused, by reason: malformed, too_large, headers, encoding, "
            "depth, unauthenticated, not_allowed, user_id, revoked, invalid, failed", ["reason"],
            registry=None),
        batch_size=Histogram(
            "dbaas_guest_batch_messages", "Guests' messages written per transaction",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=None),
        latency=Histogram(
            "dbaas_heartbeat_send_to_commit_seconds",
            "From a heartbeat's `sent` (the guest's clock) to the commit that applied it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=None),
    )
    for task in (wire.HEARTBEAT_TASK, wire.UPDATE_BACKUP_TASK):
        for outcome in ("applied", "stale"):
            metrics.guest_messages.labels(task, outcome)
    for reason in REFUSAL_REASONS:
        metrics.refusals.labels(reason)
    return metrics


@functools.cache
def _pool_metrics() -> SimpleNamespace:
    """Counted by pool processes (sweeps), kept in this worker's files."""
    return SimpleNamespace(
        sweeps=Counter("dbaas_sweeps_total", "Timeout sweeps run"),
        sweep_changes=Counter(
            "dbaas_sweep_changes_total",
            "What the timeout sweeps changed: build_timeouts, heartbeat_expiries, "
            "backup_timeouts, watermarks_removed", ["change"]),
    )


def refused(kind: str) -> None:
    _guest_metrics().refusals.labels(kind).inc()


def batch_settled(size: int, accepted: dict[str, int], applied: dict[str, int],
                  latencies: list[float]) -> None:
    """One batch committed: its size, per task how many were accepted and applied (the
    rest were stale), and each heartbeat's send-to-commit latency."""
    metrics = _guest_metrics()
    metrics.batch_size.observe(size)
    for task, count in accepted.items():
        metrics.guest_messages.labels(task, "applied").inc(applied[task])
        metrics.guest_messages.labels(task, "stale").inc(count - applied[task])
    for latency in latencies:
        metrics.latency.observe(latency)


def sweep_done(changes: dict[str, int]) -> None:
    metrics = _pool_metrics()
    metrics.sweeps.inc()
    for change, count in changes.items():
        metrics.sweep_changes.labels(change).inc(count)


class StateCollector:
    """Instances by API status and queue depths, read when scraped (and cached briefly, so
    that several scrapers cost one query)."""

    def __init__(self, queues: list[str]):
        self.queues = queues
        self._cached: tuple[float, list] | None = None

    def collect(self):
        if self._cached is None or time.monotonic() - self._cached[0] > SCRAPE_CACHE_SECONDS:
            self._cached = (time.monotonic(), [self._instances(), self._depths()])
        yield from self._cached[1]

    @staticmethod
    def _instances():
        family = GaugeMetricFamily("dbaas_instances", "Live instances by status", labels=["status"])
        try:
            counts = db.run_transaction(instances.count_by_status, retry_for=0)
        except Exception as exc:
            log.warning("metrics: instances not counted: %s", exc)
            return family
        for status, count in sorted(counts.items()):
            family.add_metric([status], count)
        return family

    def _depths(self):
        family = GaugeMetricFamily("dbaas_queue_messages", "Messages ready in a queue", labels=["queue"])
        try:
            with Connection(settings.get().broker_url, connect_timeout=3) as connection:
                for name in self.queues:
                    # A passive declare of a queue nobody declared yet closes its channel.
                    with connection.channel() as channel:
                        try:
                            depth = channel.queue_declare(name, passive=True).message_count
                        except connection.channel_errors:
                            continue
                    family.add_metric([name], depth)
        except Exception as exc:
            log.warning("metrics: queue depths not read: %s", exc)
        return family


def serve(queues: list[str]) -> None:
    """Start the HTTP endpoint in this (the main) process; a conductor whose port is taken
    by another on the same host goes on without one, saying so."""
    config = settings.get()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    for metric in vars(_guest_metrics()).values():
        registry.register(metric)
    registry.register(StateCollector(queues))
    try:
        start_http_server(config.metrics_port, addr=config.metrics_address, registry=registry)
    except OSError as exc:
        log.warning("metrics: not served on %s:%d: %s", config.metrics_address, config.metrics_port, exc)
        return
    log.info("metrics on http://%s:%d/metrics", config.metrics_address, config.metrics_port)
