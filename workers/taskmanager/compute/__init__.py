"""Compute drivers by name. ``DBAAS_COMPUTE_DRIVER`` picks one; ``local`` is the default."""

import importlib

from dbaas import settings

from workers.taskmanager.compute.base import ComputeDriver, SpawnError

__all__ = ["ComputeDriver", "SpawnError", "DRIVERS", "get_driver"]

# name -> "module:factory". Imported only when chosen, so a driver's own dependencies
# (a container runtime's client, libvirt, ssh) are needed only where it runs.
DRIVERS = {
    "local": "workers.taskmanager.compute.local:LocalDriver",
    # The same processes, each in a network namespace that reaches only the broker.
    "netns": "workers.taskmanager.compute.netns:NetnsDriver",
}


def get_driver(name: str | None = None) -> ComputeDriver:
    name = name or settings.get().compute_driver
    if name not in DRIVERS:
        raise ValueError(f"unknown compute driver {name!r}; choose one of {', '.join(DRIVERS)}")
    module, _, factory = DRIVERS[name].partition(":")
    return getattr(importlib.import_module(module), factory)()
