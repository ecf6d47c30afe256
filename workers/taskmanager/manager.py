"""The serving half of ``api.py``: the taskmanager's work as plain methods taking
primitives, same names (``tasks.py`` decodes a message and calls one of these).

Every request may be delivered more than once (late acknowledgement, redelivery after a
worker died), so each method is idempotent; none touches the database but through the
conductor's client.
"""

import logging
from datetime import datetime, timezone

from kombu.exceptions import KombuError

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
            if DATASTORES[datastore].needs_port:
                host, port = self.driver.allocate_endpoint(instance_id)
                self.conductor.instance_update(instance_id, host=host, port=port)
                prepare.update(port=port, host=host)
            guests.declare_queues(instance_id)
            broker_url = self.broker_users.ensure(instance_id, generation,
                                                  self.driver.broker_endpoint(instance_id))
            self.driver.spawn(instance_id, guests.config_for(instance_id, generation, datastore, broker_url))
            guests.send(instance_id, generation, "prepare", prepare)
            if self.driver.is_deleted(instance_id):  # meanwhile: the prepare declared its queue again
                raise InstanceDeleted(f"instance {instance_id} was deleted")
        except InstanceDeleted:
            log.info("instance %s was deleted while it was being provisioned: undoing", instance_id)
            self.driver.destroy(instance_id)
            self.broker_users.remove(instance_id)
            guests.delete_queues(instance_id)
        except (SpawnError, GuestUnreachable, BrokerUserError, KombuError, OSError) as exc:
            log.warning("provisioning %s failed: %s", instance_id, exc)
            self.conductor.instance_update(
                instance_id, fault_kind=PROVISIONING_FAILED, fault_message=str(exc),
                fault_at=datetime.now(timezone.utc).isoformat())

    def delete_instance(self, instance_id: str) -> None:
        """Its guest and data first, then its broker user (which closes the guest's
        connections, should one have escaped) and command queue, then the record."""
        self.driver.destroy(instance_id)
        self.broker_users.remove(instance_id)
        guests.delete_queues(instance_id)
        self.conductor.instance_deleted(instance_id)

    def restart_instance(self, instance_id: str, generation: int) -> None:
        if not self.driver.is_running(instance_id):
            log.warning("no guest runs for %s: the restart waits in its queue", instance_id)
        guests.send(instance_id, generation, "restart", {})

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
