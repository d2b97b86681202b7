"""The outbox as admins see it: list entries (one line per output series and state, or
each entry), re-queue dead letters, drop a discarded series' entries."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from storage.audit import AuditKind, AuditLog
from storage.models import OutboxEntry, OutboxState, OutputInstance, Series, as_utc, utcnow


@dataclass(frozen=True)
class OutboxRow:
    """One outbox entry, or (``count`` > 1) the entries of one output series that share a
    destination and state: ``attempts`` is then the most any of them made,
    ``next_attempt_at`` the earliest, ``last_error`` and ``last_status`` the newest
    entry's that has one."""

    id: int
    destination: str
    state: str
    attempts: int
    last_status: int | None
    last_error: str
    next_attempt_at: datetime
    sop_uid: str
    kind: str
    series_uid: str = ""  # the output series
    source_series_uid: str = ""  # the received series it was made from
    accession_number: str = ""
    count: int = 1
    peer: str = ""  # AE@host:port it goes to


def _conditions(state: str | None, destination: str | None,
                series_uids: Collection[str] | None,
                study_uid: str | None) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if state:
        conditions.append(OutboxEntry.state == state)
    if destination:
        conditions.append(OutboxEntry.destination == destination)
    if series_uids is not None:
        conditions.append(OutputInstance.series_uid.in_(series_uids)
                          | Series.series_uid.in_(series_uids))
    if study_uid:
        conditions.append(Series.study_uid == study_uid)
    return conditions


def count_entries(session: Session, state: str | None = None, destination: str | None = None,
                  series_uids: Collection[str] | None = None, study_uid: str | None = None) -> int:
    """How many entries match (whatever a listing's limit shows of them)."""
    return int(session.scalar(
        select(func.count()).select_from(OutboxEntry)
        .join(OutputInstance, OutputInstance.id == OutboxEntry.output_id)
        .outerjoin(Series, Series.id == OutputInstance.source_series_id)
        .where(*_conditions(state, destination, series_uids, study_uid))) or 0)


def list_entries(session: Session, state: str | None = None, destination: str | None = None,
                 limit: int = 100, series_uids: Collection[str] | None = None,
                 study_uid: str | None = None) -> Sequence[OutboxRow]:
    """Every entry, newest first. ``series_uids`` matches the output series or the series
    it was made from."""
    query = (select(OutboxEntry, OutputInstance, Series.series_uid, Series.accession_number)
             .join(OutputInstance, OutputInstance.id == OutboxEntry.output_id)
             .outerjoin(Series, Series.id == OutputInstance.source_series_id)
             .order_by(OutboxEntry.id.desc()).limit(limit))
    query = query.where(*_conditions(state, destination, series_uids, study_uid))
    return [OutboxRow(entry.id, entry.destination, entry.state, entry.attempts,
                      entry.last_status, entry.last_error, entry.next_attempt_at,
                      output.sop_uid, output.kind, output.series_uid, source_uid or "",
                      accession or "", 1, f"{entry.ae_title}@{entry.host}:{entry.port}")
            for entry, output, source_uid, accession in session.execute(query).all()]


def list_series(session: Session, state: str | None = None, destination: str | None = None,
                limit: int = 100, series_uids: Collection[str] | None = None,
                study_uid: str | None = None) -> Sequence[OutboxRow]:
    """The entries collapsed: one row per output series, destination and state (newest
    first), so a 176-slice SC series is one line, not 176."""
    newest = func.max(OutboxEntry.id)
    query = (select(newest, OutboxEntry.destination, OutboxEntry.state,
                    func.max(OutboxEntry.attempts), func.min(OutboxEntry.next_attempt_at),
                    OutputInstance.kind, OutputInstance.series_uid, Series.series_uid,
                    Series.accession_number, func.count(), func.min(OutputInstance.sop_uid))
             .join(OutputInstance, OutputInstance.id == OutboxEntry.output_id)
             .outerjoin(Series, Series.id == OutputInstance.source_series_id)
             .group_by(OutboxEntry.destination, OutboxEntry.state, OutputInstance.kind,
                       OutputInstance.series_uid, Series.series_uid, Series.accession_number)
             .order_by(newest.desc()).limit(limit))
    query = query.where(*_conditions(state, destination, series_uids, study_uid))
    rows = []
    for (entry_id, dest, entry_state, attempts, next_at, kind, series_uid, source_uid,
         accession, count, sop_uid) in session.execute(query).all():
        # The newest reason among the group (what the last attempt said).
        reason = session.execute(
            select(OutboxEntry.last_status, OutboxEntry.last_error, OutboxEntry.ae_title,
                   OutboxEntry.host, OutboxEntry.port)
            .join(OutputInstance, OutputInstance.id == OutboxEntry.output_id)
            .where(OutboxEntry.destination == dest, OutboxEntry.state == entry_state,
                   OutputInstance.series_uid == series_uid)
            .order_by((OutboxEntry.last_error != "").desc(), OutboxEntry.id.desc())
            .limit(1)).one()
        rows.append(OutboxRow(entry_id, dest, entry_state, attempts, reason[0], reason[1],
                              next_at, sop_uid, kind, series_uid, source_uid or "",
                              accession or "", count, f"{reason[2]}@{reason[3]}:{reason[4]}"))
    return rows


def next_retry_text(row: OutboxRow) -> str:
    """When a pending entry is sent next: 'now' if due, else the UTC time; '-' otherwise."""
    if row.state != OutboxState.PENDING:
        return "-"
    at = as_utc(row.next_attempt_at)
    return "now" if at <= utcnow() else f"{at:%Y-%m-%d %H:%M:%S}"


def retry_dead(session: Session, audit: AuditLog, destination: str | None = None,
               requested_by: str = "") -> int:
    """Re-queue dead letters (all, or one destination's); returns how many. The audit
    event names who asked."""
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
                    requeued=len(entries), requested_by=requested_by)
    return len(entries)


def discard_entries(session: Session, audit: AuditLog, series: Series,
                    requested_by: str) -> int:
    """Drop what of a series still waits in the outbox (pending and dead entries of every
    version: they become ``discarded`` and are never sent, nor re-queued by ``outbox
    retry``); returns how many. An entry already on the wire when this commits finishes
    its C-STORE (and is recorded as sent)."""
    entries = session.scalars(
        select(OutboxEntry).join(OutputInstance, OutputInstance.id == OutboxEntry.output_id)
        .where(OutputInstance.source_series_id == series.id,
               OutboxEntry.state.in_((OutboxState.PENDING, OutboxState.DEAD)))).all()
    for entry in entries:
        entry.state = OutboxState.DISCARDED
        before = f" (last failure: {entry.last_error})" if entry.last_error else ""
        entry.last_error = f"series discarded by {requested_by}{before}"
    audit.record_in(session, AuditKind.OUTBOX_DISCARD, study_uid=series.study_uid,
                    series_uid=series.series_uid, discarded=len(entries),
                    requested_by=requested_by)
    return len(entries)
