"""The outbox as admins see it: list entries, re-queue dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.audit import AuditKind, AuditLog
from storage.models import OutboxEntry, OutboxState, OutputInstance, utcnow


@dataclass(frozen=True)
class OutboxRow:
    id: int
    destination: str
    state: str
    attempts: int
    last_status: int | None
    last_error: str
    next_attempt_at: datetime
    sop_uid: str
    kind: str


def list_entries(session: Session, state: str | None = None, destination: str | None = None,
                 limit: int = 100) -> Sequence[OutboxRow]:
    query = (select(OutboxEntry, OutputInstance)
             .join(OutputInstance, OutputInstance.id == OutboxEntry.output_id)
             .order_by(OutboxEntry.id.desc()).limit(limit))
    if state:
        query = query.where(OutboxEntry.state == state)
    if destination:
        query = query.where(OutboxEntry.destination == destination)
    return [OutboxRow(entry.id, entry.destination, entry.state, entry.attempts, entry.last_status,
                      entry.last_error, entry.next_attempt_at, output.sop_uid, output.kind)
            for entry, output in session.execute(query).all()]


def retry_dead(session: Session, audit: AuditLog, destination: str | None = None) -> int:
    """Re-queue dead letters (all, or one destination's); returns how many."""
    query = select(OutboxEntry).where(OutboxEntry.state == OutboxState.DEAD)
    if destination:
        query = query.where(OutboxEntry.destination == destination)
    entries = session.scalars(query).all()
    for entry in entries:
        entry.state = OutboxState.PENDING
        entry.attempts = 0
        entry.created_at = utcnow()
        entry.next_attempt_at = utcnow()
    audit.record_in(session, AuditKind.OUTBOX_RETRY, destination=destination or "all",
                    requeued=len(entries))
    return len(entries)
