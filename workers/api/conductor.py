"""The API's client of the conductor: every read and write of the API is one call of it
(workers/conductor/api.py), answered from the conductor's records — never by a guest."""

from functools import cache

from workers.conductor.api import ConductorAPI


@cache
def conductor() -> ConductorAPI:
    from dbaas.celery import app  # the Celery app reads the settings: not at import time
    return ConductorAPI(app)
