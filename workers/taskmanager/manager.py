"""The serving half of ``api.py``: the taskmanager's work as plain methods taking
primitives, same names (``tasks.py`` decodes a message and calls one of these).

Every request may be delivered more than once (late acknowledgement, redelivery after a
worker died), so each method is idempotent; none touches the database but through the
conductor's client.

A guest that died is started again — with its data as it left it and its config derived
anew (nothing of it is stored but what the driver holds) — by ``restart_instance`` and by
``reconcile``, which beat runs periodically and every taskmanager once as it starts.
"""

import logging
import time
from datetime import datetime, timezone

from kombu.exceptions import KombuError

from dbaas import errors
from dbaas.status import HEARTBEAT_EXPIRED
from dbaas.storage import LocalStorage, StorageError
from workers.conductor.api import ConductorAPI
from workers.guestagent.api import DATASTORES
from workers.taskmanager import guests
from workers.taskmanager.broker_users import BrokerUserError, BrokerUsers
from workers.taskmanager.compute import ComputeDriver, SpawnError
from workers.taskmanager.compute.base import InstanceDeleted
from workers.taskmanager.guests import GuestUnreachable

log = logging.getLogger(__name__)

PROVISIONING_FAILED = "provisioning_failed"
# A guest that died could not be started again: the driver holds no data of the instance
# (GUEST_LOST), or starting it failed (RESPAWN_FAILED). Reconcile leaves such an instance
# to the operator, whose restart tries again.
GUEST_LOST = "guest_lost"
RESPAWN_FAILED = "respawn_failed"
# How long delete waits for a guest it did not start itself to take its stop command.
STOP_GRACE = 2.0
# Instances per call when reconcile asks the conductor for them.
RECONCILE_PAGE = 500


class Manager:
    def __init__(self, driver: ComputeDriver, conductor: ConductorAPI,
                 broker_users: BrokerUsers | None = None):
        self.driver = driver
        self.conductor = conductor
        self.broker_users = broker_users or BrokerUsers()

    def create_instance(self, instance_id: str, datastore: str, restore_location: str | None,
                        generation: int) -> None:
        """Give the guest its broker user and queues, start it with its config unless an
        earlier delivery already did, and ask it to prepare its datastore. A guest may so
        receive prepare twice; it treats the second as done.

        The instance's delete may run before this (a redelivered create) or beside it
        (another worker process): the driver then starts nothing, and what this create
        made — its directory, broker user, command queue — is removed again."""
        prepare = {"restore_location": restore_location} if restore_location else {}
        try:
            if datastore not in DATASTORES:
                raise SpawnError(f"unknown datastore {datastore!r}")
            prepare.update(self._record_endpoint(instance_id, datastore))
            self._start_guest(instance_id, generation, datastore)
            guests.send(instance_id, generation, "prepare", prepare)
            if self.driver.is_deleted(instance_id):  # meanwhile: the prepare declared its queue again
                raise InstanceDeleted(f"instance {instance_id} was deleted")
        except InstanceDeleted:
            log.info("instance %s was deleted while it was being provisioned: undoing", instance_id)
            self.driver.destroy(instance_id)
            self.broker_users.remove(instance_id)
            guests.delete_queues(instance_id)
        except (SpawnError, GuestUnreachable, BrokerUserError, KombuError, OSError) as exc:
            self._fault(instance_id, PROVISIONING_FAILED, str(exc))

    def _record_endpoint(self, instance_id: str, datastore: str) -> dict:
        """Record where clients connect (the same answer every time for one instance);
        what prepare must be told of it."""
        info = DATASTORES[datastore]
        fields, prepare = {}, {}
        if info.needs_port:
            host, port = self.driver.allocate_endpoint(instance_id)
            fields.update(host=host, port=port)
            prepare.update(port=port, host=host)
        connection = info.connection(self.driver.data_dir(instance_id), fields.get("host"), fields.get("port"))
        if connection:
            fields["connection"] = connection
        if fields:
            self.conductor.instance_update(instance_id, **fields)
        return prepare

    def _start_guest(self, instance_id: str, generation: int, datastore: str) -> None:
        """Its broker user and queues, then the guest with its config, unless one runs."""
        guests.declare_queues(instance_id)
        broker_url = self.broker_users.ensure(instance_id, generation,
                                              self.driver.broker_endpoint(instance_id))
        self.driver.spawn(instance_id, guests.config_for(instance_id, generation, datastore, broker_url))

    def delete_instance(self, instance_id: str, generation: int | None = None) -> None:
        """Its guest and data first — the agent recorded in the data, however it was
        started, and whatever runs in its directory — then its broker user (which closes
        the connections of a guest that escaped, say one started by hand from a copy of
        its config) and command queue, then the record. The embedded broker has no users:
        there such a guest is sent ``stop`` instead."""
        self.driver.destroy(instance_id)
        if generation is not None and not self.broker_users.enabled:
            self._stop_other_guests(instance_id, generation)
        self.broker_users.remove(instance_id)
        guests.delete_queues(instance_id)
        self.conductor.instance_deleted(instance_id)

    def _stop_other_guests(self, instance_id: str, generation: int) -> None:
        """Send ``stop`` and give a guest consuming the queue a moment to take it before
        the queue goes. Only a guest consuming at that moment gets it: one busy with a long
        command, or away from the broker, beats on (into refusals) until stopped by hand."""
        try:
            guests.send(instance_id, generation, "stop", {})
            deadline = time.monotonic() + STOP_GRACE
            while guests.commands_waiting(instance_id) and time.monotonic() < deadline:
                time.sleep(0.1)
        except (GuestUnreachable, KombuError, OSError) as exc:
            log.warning("could not send stop to other guests of %s: %s", instance_id, exc)

    def restart_instance(self, instance_id: str, generation: int, datastore: str) -> None:
        """Restart the datastore through its guest; a guest that is gone is started again
        instead (it starts the datastore as it comes up)."""
        if self.driver.is_running(instance_id):
            guests.send(instance_id, generation, "restart", {})
        else:
            self.respawn(instance_id, generation, datastore)

    def respawn(self, instance_id: str, generation: int, datastore: str) -> None:
        """Start the instance's guest again on the data it left, or put the instance in
        ERROR with a fault that says why not."""
        if not self.driver.holds(instance_id):
            self._fault(instance_id, GUEST_LOST, "no guest agent runs for the instance and this "
                        "host holds none of its data to start one on")
            return
        try:
            self._record_endpoint(instance_id, datastore)
            self._start_guest(instance_id, generation, datastore)
        except InstanceDeleted:
            log.info("instance %s was deleted meanwhile: not starting its guest", instance_id)
        except (SpawnError, GuestUnreachable, BrokerUserError, KombuError, OSError) as exc:
            self._fault(instance_id, RESPAWN_FAILED, f"the guest agent could not be started again: {exc}")
        else:
            log.info("started the guest of %s again", instance_id)

    def reconcile(self) -> None:
        """Every instance the conductor says should run has a guest on this host. One
        whose guest is gone gets a new one, unless it is being deleted, its create may not
        have run yet, or it is faulted for a reason a new guest would not mend (that is
        the operator's: restart tries again)."""
        try:
            live = list(self._live_instances())
        except errors.Unavailable as exc:  # a taskmanager may start before any conductor
            log.warning("reconcile skipped: %s", exc)
            return
        listed = set()
        for instance in live:
            listed.add(instance_id := instance["id"])
            if instance["task_status"] == "DELETING" or \
                    instance["fault_kind"] not in (None, HEARTBEAT_EXPIRED) or \
                    self.driver.is_running(instance_id):
                continue
            if instance["task_status"] == "BUILDING" and not self.driver.holds(instance_id):
                continue
            log.warning("no guest runs for instance %s: starting one", instance_id)
            self.respawn(instance_id, instance["generation"], instance["datastore"])
        if orphans := self.driver.held() - listed:
            log.warning("this host holds guests of instances that are not live (deletes that "
                        "did not finish, or another control plane's): %s", ", ".join(sorted(orphans)))

    def _live_instances(self):
        marker = None
        while True:
            page = self.conductor.instance_guests(limit=RECONCILE_PAGE, marker=marker)
            yield from page
            if len(page) < RECONCILE_PAGE:
                return
            marker = page[-1]["id"]

    def reset_password(self, instance_id: str, generation: int, password_generation: int) -> None:
        guests.send(instance_id, generation, "reset_password", {"generation": password_generation})

    def _fault(self, instance_id: str, kind: str, message: str) -> None:
        log.warning("instance %s: %s", instance_id, message)
        self.conductor.instance_update(instance_id, fault_kind=kind, fault_message=message,
                                       fault_at=datetime.now(timezone.utc).isoformat())

    def create_backup(self, backup_id: str, instance_id: str, generation: int) -> None:
        """The guest does the work and reports through conductor.update_backup; a backup no
        guest will ever see fails now instead of at its timeout."""
        if not self.driver.is_running(instance_id):
            self.conductor.backup_fail(backup_id, f"no guest agent runs for instance {instance_id}")
            return
        try:
            guests.send(instance_id, generation, "backup", {"backup_id": backup_id})
        except GuestUnreachable as exc:
            self.conductor.backup_fail(backup_id, str(exc))

    def delete_backup(self, backup_id: str, location: str | None) -> None:
        if location:
            try:
                LocalStorage(guests.backup_root()).delete(location)
            except StorageError as exc:
                # The location came from a guest: one outside the backup root names nothing
                # of ours to remove, and must not keep the record from going.
                log.warning("backup %s: nothing removed: %s", backup_id, exc)
        self.conductor.backup_deleted(backup_id)
