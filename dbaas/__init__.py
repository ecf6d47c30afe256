"""dbaas: a database-as-a-service control plane.

Kept import-free on purpose: guest agents import small modules of this package
(signing, wire formats, the embedded broker) and must not pull in the Celery app or
the database layer. ``celery -A dbaas`` finds the app in ``dbaas.celery``.
"""
