"""The conductor: the only service holding the control-plane database connection.

Where each message is handled: ``tasks.py`` registers the task names; the logic lives in
``heartbeats.py`` (conductor.heartbeat), ``backups.py`` (conductor.update_backup) and
``crud.py`` (control-plane CRUD). ``messages.py`` validates what guests send and
``auth.py`` decides who sent it.
"""
