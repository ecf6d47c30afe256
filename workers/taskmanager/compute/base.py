"""What the taskmanager needs from wherever guests run: processes, containers, VMs, hosts."""

from abc import ABC, abstractmethod

from workers.guestagent.api import GuestConfig


class SpawnError(Exception):
    """The guest could not be started; the message says why (it becomes the instance's fault)."""


class InstanceDeleted(SpawnError):
    """The instance was deleted (its delete ran before, or beside, this create): nothing of
    it may be started, and what a create made for it must be removed again."""


class ComputeDriver(ABC):
    @abstractmethod
    def spawn(self, instance_id: str, config: GuestConfig) -> None:
        """Deliver ``config`` to the instance (the driver chooses its ``data_dir``) and
        start its guest agent, unless it already runs: a redelivered request must not
        start a second guest."""

    @abstractmethod
    def is_running(self, instance_id: str) -> bool:
        """Whether the instance's guest agent is alive, however it was started."""

    @abstractmethod
    def holds(self, instance_id: str) -> bool:
        """Whether the driver holds the instance's guest — its data and config — so that a
        guest that died can be started again."""

    @abstractmethod
    def held(self) -> set[str]:
        """Every instance the driver holds."""

    def data_dir(self, instance_id: str) -> str | None:
        """Where the instance's guest keeps its data as clients of this host reach it (for
        a datastore that is a file); None when they cannot."""
        return None

    @abstractmethod
    def destroy(self, instance_id: str) -> None:
        """Stop the guest and everything it started and remove all the instance's files.
        Idempotent: destroying what is already gone does nothing."""

    def is_deleted(self, instance_id: str) -> bool:
        """Whether ``destroy`` was called for the instance (a create must then start
        nothing). Drivers that cannot tell answer False."""
        return False

    def broker_endpoint(self, instance_id: str) -> tuple[str, int] | None:
        """(host, port) at which the instance's guest reaches the broker, when that is not
        where the control plane reaches it (a guest in a network of its own)."""
        return None

    @abstractmethod
    def allocate_endpoint(self, instance_id: str) -> tuple[str, int]:
        """(host, port) the instance's database will listen on; the same answer on every
        call for one instance, so a redelivered create records what the first one did."""
