"""The taskmanager: provisions and tears down instances and relays commands to their guests.

It holds no database credentials: every write goes to the conductor's CRUD tasks.

``tasks.py`` registers the ``taskmanager.*`` names and hands over to ``manager.py``, which
holds the logic; ``task_base.py`` refuses messages not signed with the service key;
``api.py`` is the client side that enqueues the tasks (manage.py, the API);
``conductor_api.py`` sends the conductor's CRUD tasks; ``guests.py`` knows where a guest's
files are and sends it commands; ``compute/`` holds the drivers that run guests
(``DBAAS_COMPUTE_DRIVER``, default ``local``: one OS process per guest).
"""
