"""dbaas.celery: once a worker is ready, what it made while starting is frozen out of the
cyclic collector, and its young generation is larger (freeze_startup_objects)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_ready_worker_freezes_its_startup_objects():
    script = ("import gc, json; from celery import signals; from dbaas import celery; "
              "before = (gc.get_freeze_count(), gc.get_threshold()); "
              "signals.worker_ready.send(sender=None); "
              "print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold(), celery.GC_YOUNG]))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    (frozen_before, threshold_before), frozen, threshold, young = json.loads(out.stdout.splitlines()[-1])
    assert frozen_before == 0 and frozen > 10_000  # the app, its modules and settings
    assert threshold == [young, *threshold_before[1:]] and young > threshold_before[0]
