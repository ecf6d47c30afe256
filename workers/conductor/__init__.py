"""The conductor: the only service holding the control-plane database connection.

Where each message is handled: ``api.py`` is the client every other process uses (task
names are constants there); ``tasks.py`` registers those names and hands over to
``manager.py`` (one function per call or cast), which uses ``instances.py`` and
``backups.py`` (the rules of each entity), ``quotas.py`` (each project's limits, checked in
the transaction that inserts), ``paging.py`` (lists in pages), ``sweeps.py`` (timeouts)
and, for guests' messages, ``consumer.py`` (the guests' queue: checks, batches,
acknowledgements), ``heartbeats.py`` (conductor.heartbeat) and ``backups.py``
(conductor.update_backup). ``messages.py`` validates what guests send,
``auth.py`` decides who sent it and ``ordering.py`` keeps their messages in order.
"""
