"""The REST API process (``python -m workers.api``): Trove's v1.0 API for tenants, every
database read and write a call of the conductor (``conductor.py``); it holds no database.

``app.py`` builds the application; ``auth.py`` authenticates every request under a
project (``credentials.py``: who may, as which project); ``body_limit.py`` refuses large
bodies; ``errors.py`` turns every error into Trove's fault body; ``views.py`` makes Trove's
bodies from the conductor's records; one module of routes per resource: ``instances.py``,
``backups.py``, ``datastores.py``, ``flavors.py``, ``limits.py``, ``versions.py``;
``catalog.py`` holds what is offered (datastores, flavors).
"""
