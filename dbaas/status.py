"""How an instance's stored fields read as the API's ``status`` and ``operating_status``."""

# Datastore statuses that mean the database answers: they end BUILD and clear a
# missed-heartbeat fault.
ALIVE_SERVICE_STATUSES = frozenset({"running", "healthy"})
# The guest says the datastore could not be brought up: ERROR at once, even during BUILD
# (otherwise the instance would look like it is building until the build timeout).
FAILED_SERVICE_STATUSES = frozenset({"failed to spawn"})
# fault_kind the heartbeat-expiry sweep sets; valid heartbeats clear it.
HEARTBEAT_EXPIRED = "heartbeat_expired"
# What a guest reports while a restart (or the prepare a restarted guest redoes) is still
# under way: any other status ends the instance's REBOOTING task.
RESTART_UNDER_WAY = frozenset({"restarting", "new", "building"})

TASK_STATUS_API = {
    "BUILDING": "BUILD",
    "REBOOTING": "REBOOT",
    "DELETING": "SHUTDOWN",
    "BACKING_UP": "BACKUP",
    "RESTORING": "BUILD",
}
SERVICE_STATUS_API = {
    "new": "BUILD",
    "building": "BUILD",
    "running": "ACTIVE",
    "healthy": "ACTIVE",
    "shutdown": "SHUTDOWN",
    "crashed": "ERROR",
    "failed to spawn": "ERROR",
    "guestagent error": "ERROR",
    "unknown": "ERROR",
    "blocked": "BLOCKED",
    "paused": "SHUTDOWN",
    "restart required": "RESTART_REQUIRED",
    "restarting": "REBOOT",
    "upgrading": "UPGRADE",
}


def api_status(*, deleted: bool, task_status: str, service_status: str | None,
               fault_kind: str | None) -> str:
    if deleted:
        return "DELETED"
    if fault_kind or service_status in FAILED_SERVICE_STATUSES:
        return "ERROR"
    if task_status in TASK_STATUS_API:
        return TASK_STATUS_API[task_status]
    return SERVICE_STATUS_API.get(service_status, "BUILD")


def operating_status(service_status: str | None) -> str:
    return (service_status or "").upper().replace(" ", "_")
