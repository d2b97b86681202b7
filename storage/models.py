"""SQLAlchemy 2.0 models: what the node received, what it did, and what it sent.

Series states (persisted; every change is an audit event)::

    receiving -> ready -> queued -> running -> done | skipped | failed
        ^                                        |
        +------------- late instance ------------+   (reopens with version + 1)

    A late instance also reopens a series that is ready or queued (same version) or
    running (version + 1: the running job's result is not recorded, ``Superseded``).

    any state -> discarded (``dicom-node discard``); a finished or discarded series ->
    ready with version + 1 (``dicom-node reprocess``)
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """The UTC datetime stored: SQLite hands back naive datetimes (they were stored as
    UTC), PostgreSQL aware ones in the session's time zone (the server's ``timezone``)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class SeriesState(StrEnum):
    """A series' place in the pipeline (``series.state``); every change goes through
    :func:`dicom_node.series.tracking.set_state`."""

    RECEIVING = "receiving"
    READY = "ready"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    DISCARDED = "discarded"  # an admin stopped it (``dicom-node discard``)


#: The states a series rests in: a late instance reopens them with version + 1, and
#: ``dicom-node reprocess`` runs them again.
FINISHED_STATES: frozenset[SeriesState] = frozenset(
    {SeriesState.DONE, SeriesState.SKIPPED, SeriesState.FAILED, SeriesState.DISCARDED})


class JobState(StrEnum):
    """``jobs.state``: one processing run of one series version."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ABANDONED = "abandoned"  # the node stopped while it ran (set at the next start)


class OutboxState(StrEnum):
    """``outbox.state``: one output instance for one destination."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    DISCARDED = "discarded"  # its series was discarded (``dicom-node discard``): never sent


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # accepted | rejected | released | aborted
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    instances: Mapped[int] = mapped_column(Integer, default=0)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING, index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    # Position along the slice normal (mm), for geometric completeness; None if unknown.
    position_mm: Mapped[float | None] = mapped_column(Float)
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # JobState
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str] = mapped_column(Text, default="")
    device: Mapped[str] = mapped_column(String(32), default="")
    seconds: Mapped[float | None] = mapped_column(Float)
    # The lease (several workers on one database): the node that claimed the job (its
    # heartbeat name) holds it until lease_until, renewed while it runs; an expired lease
    # is taken over (the job abandoned, its series queued again). The job's id is the
    # fencing token: a node commits a result only while its job is still running.
    owner: Mapped[str] = mapped_column(String(300), default="", server_default="")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class OutputInstance(Base):
    __tablename__ = "output_instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # sc | sr | seg
    source_series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OutboxEntry(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("output_id", "destination"),
        Index("ix_outbox_due", "state", "destination", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("output_instances.id"))
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The sender that claimed the entry (SELECT ... FOR UPDATE SKIP LOCKED) until
    # lease_until; the claim ends with the outcome, or lapses if that sender dies.
    claimed_by: Mapped[str] = mapped_column(String(300), default="", server_default="")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Append-only. Each row carries the hash of the previous one (a tamper-evident chain)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(48), index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="ok")  # ok | warning | error
    study_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    series_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), default="")
    peer: Mapped[str] = mapped_column(String(96), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # The node that wrote the event (its heartbeat name, as leases name their owner:
    # ``<host>[/<role>]:<port>``, ``<host>/cli`` for admin commands); "" for events
    # written before migration 0004. No Python-side default: a writer without a node
    # leaves the column out of its INSERT (see storage.audit).
    node: Mapped[str] = mapped_column(String(300), server_default="")


class NodeState(StrEnum):
    """``node_heartbeats.state``: what a ``dicom-node serve`` process last said of itself."""

    RUNNING = "running"
    STOPPING = "stopping"  # SIGTERM: finishing the running job
    STOPPED = "stopped"  # a clean stop; a crash leaves RUNNING with an old beat_at


class NodeHeartbeat(Base):
    """One row per node (``<host>:<port>``), rewritten every ``node.heartbeat_interval_s``
    by the running ``dicom-node serve`` (:mod:`dicom_node.ops.heartbeat`); ``dicom-node
    status`` tells from it whether the node runs, and with what."""

    __tablename__ = "node_heartbeats"

    node: Mapped[str] = mapped_column(String(300), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=NodeState.RUNNING)
    version: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str] = mapped_column(String(128), default="")  # name and version
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    device: Mapped[str] = mapped_column(String(32), default="")  # the one in use: cpu, cuda:0
    listening: Mapped[str] = mapped_column(String(300), default="")  # AE@address:port
    healthy: Mapped[bool] = mapped_column(Boolean, default=True)
    job_stage: Mapped[str] = mapped_column(String(128), default="")  # of the running job
    interval_s: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class NotificationState(StrEnum):
    """``notifications.state``: one message for one notification endpoint."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class Notification(Base):
    """A message to a notification endpoint (webhook or FHIR), made from an audit event
    (:mod:`dicom_node.outbox.notifications`) in the transaction that moves the cursor."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))  # done | skipped | failed | dead_letter
    audit_event_id: Mapped[int] = mapped_column(Integer)  # the event it reports
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    body: Mapped[str] = mapped_column(Text)  # exactly the bytes sent (UTF-8 JSON)
    state: Mapped[str] = mapped_column(String(16), default=NotificationState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The sender posting it (claimed with FOR UPDATE SKIP LOCKED) until lease_until.
    claimed_by: Mapped[str] = mapped_column(String(300), default="", server_default="")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NotificationCursor(Base):
    """How far the notifier has read the audit log (one row)."""

    __tablename__ = "notification_cursor"

    id: Mapped[int] = mapped_column(primary_key=True)
    last_audit_id: Mapped[int] = mapped_column(Integer)
