"""The public message contract between guests and the conductor: names and values only.

Guests import this module, so it depends on nothing but the standard library.
"""

HEARTBEAT_TASK = "conductor.heartbeat"
UPDATE_BACKUP_TASK = "conductor.update_backup"
GUEST_TASKS = frozenset({HEARTBEAT_TASK, UPDATE_BACKUP_TASK})

# Header carrying the sender's proof of identity (see dbaas.signing).
AUTH_HEADER = "dbaas_auth"


def guest_broker_user(instance_id: str) -> str:
    """The RabbitMQ user of an instance's guest. A guest publishes with it as the message's
    ``user_id``, which RabbitMQ checks against the connection's user: the broker vouches
    for the sender, besides the signature."""
    return f"instance-{instance_id}"

# Datastore statuses as a guest reports them (Trove's descriptions, each distinct).
SERVICE_STATUSES = frozenset({
    "new", "building", "running", "healthy", "shutdown", "crashed", "blocked", "paused",
    "failed to spawn", "unknown", "restart required", "restarting", "upgrading",
    "guestagent error",
})
# Only the control plane clears this one; heartbeats do not overwrite it.
STICKY_SERVICE_STATUSES = frozenset({"restart required"})

# Backup states in the order they may be reached; COMPLETED and FAILED are final.
BACKUP_STATE_RANK = {"NEW": 0, "BUILDING": 1, "SAVING": 2, "COMPLETED": 3, "FAILED": 3}
FINAL_BACKUP_STATES = frozenset({"COMPLETED", "FAILED"})

# Fields a guest may set on its backup through update_backup.
GUEST_WRITABLE_BACKUP_FIELDS = frozenset({
    "state", "size", "checksum", "location", "backup_type", "fail_reason",
})
