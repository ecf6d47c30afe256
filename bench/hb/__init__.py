"""Pieces of bench/heartbeats.py: CPU accounting (cpu), the processes it runs (processes),
the commit/CPU/queue-depth sampler (listener) and the hostile messages (hostile)."""
