"""The taskmanager: provisions and tears down instances and relays commands to their guests.

It holds no database credentials: it reads and writes only through the conductor's client
(``workers/conductor/api.py``).

``api.py`` is its own client (the conductor hands it work); ``tasks.py`` registers those
names and hands over to ``manager.py``, which holds the logic; ``task_base.py`` refuses
messages not signed with the service key; ``guests.py`` writes a guest's config and sends
it commands; ``compute/`` holds the drivers that run guests (``DBAAS_COMPUTE_DRIVER``,
default ``local``: one OS process per guest).
"""
