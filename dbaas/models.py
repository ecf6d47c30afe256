"""The control-plane schema. Times are naive UTC (SQLite keeps no zone)."""

import uuid
from datetime import datetime, timezone

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    tenant_id: Mapped[str] = mapped_column(String(64), default="default")
    datastore: Mapped[str] = mapped_column(String(32), default="sqlite")
    datastore_version: Mapped[str | None] = mapped_column(String(32))
    # What the control plane is doing to the instance: NONE, BUILDING, REBOOTING, DELETING…
    task_status: Mapped[str] = mapped_column(String(32), default="NONE")
    # The datastore status exactly as the guest last reported it (a wire status).
    service_status: Mapped[str | None] = mapped_column(String(32))
    service_status_updated: Mapped[datetime | None] = mapped_column(DateTime)
    guest_agent_version: Mapped[str | None] = mapped_column(String(64))
    # Conductor's clock when the last accepted heartbeat was written: liveness.
    last_heartbeat: Mapped[datetime | None] = mapped_column(DateTime)
    # Set by the control plane (sweeps, failed provisioning); any fault means ERROR.
    fault_kind: Mapped[str | None] = mapped_column(String(32))
    fault_message: Mapped[str | None] = mapped_column(Text)
    fault_at: Mapped[datetime | None] = mapped_column(DateTime)
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    # What a client needs to connect, as JSON: {host, port, user, database} or {path}.
    connection: Mapped[str | None] = mapped_column(Text)
    # What the tenant asked for (the API's flavor id and volume size in GB); recorded and
    # shown, not enforced by the local compute driver.
    flavor_id: Mapped[str | None] = mapped_column(String(36))
    volume_size: Mapped[int | None] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The guest's secret is derived from the service key, the id and this number
    # (dbaas.signing.guest_secret); only the current generation of a live instance verifies.
    credential_generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # The administrator's password is derived from the guest's secret and this number
    # (dbaas.signing.admin_password); a reset moves to the next one.
    password_generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    __table_args__ = (
        # The build sweep filters on these. last_heartbeat has no index: every heartbeat
        # writes it, and unindexed it is written in place (migration 0005).
        Index("ix_instances_task_status_created", "task_status", "created"),
        # A project's list, in pages, and its quota count.
        Index("ix_instances_tenant_id_created", "tenant_id", "created", "id"),
    )


class Backup(Base):
    __tablename__ = "backups"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(64), default="default")
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    # The instance's at the time of the backup: what a restore will run.
    datastore: Mapped[str | None] = mapped_column(String(32))
    datastore_version: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="NEW")
    size: Mapped[float | None] = mapped_column(Float)
    checksum: Mapped[str | None] = mapped_column(String(128))
    location: Mapped[str | None] = mapped_column(String(1024))
    backup_type: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[str | None] = mapped_column(String(36))
    fail_reason: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_backups_state_created", "state", "created"),
        Index("ix_backups_tenant_id_created", "tenant_id", "created", "id"),
    )


class Project(Base):
    """A tenant's quota overrides (NULL: the configured default). Its row is also what
    concurrent creates of one project lock, so that counting and inserting are one step
    (docs/adr/0006). Created on a project's first create."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    max_instances: Mapped[int | None] = mapped_column(Integer)
    max_backups: Mapped[int | None] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Watermark(Base):
    """The newest ``sent`` applied per ordering key: ('heartbeat', instance id) or
    ('backup', backup id). A message not newer than its key's watermark is discarded."""

    __tablename__ = "watermarks"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(36), primary_key=True)
    sent: Mapped[float] = mapped_column(Float)
