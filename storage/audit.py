"""The audit log: append-only events, each chained to the previous by its hash.

``hash = sha256(prev_hash | at | kind | outcome | study | series | sop | peer | detail)``
for an event without a node (all written before migration 0004), and for one that names
its node (every event a node writes since) ``sha256("node|" + JSON array of the same
fields and the node)``: the events written before keep their hashes, and no field's text
can be moved into another unnoticed (a JSON array is unambiguous, and the old form starts
with 64 hex digits, never with ``node|``). :func:`verify_chain` recomputes the hashes and
reports the first broken link.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from storage.models import AuditEvent, as_utc, utcnow

GENESIS = "0" * 64


class AuditKind(StrEnum):
    """The ``kind`` of an audit event (stored as its string value)."""

    ASSOC_OPEN = "association.open"
    ASSOC_ACCEPT = "association.accept"
    ASSOC_REJECT = "association.reject"
    ASSOC_RELEASE = "association.release"
    ASSOC_ABORT = "association.abort"
    ECHO = "echo"
    INSTANCE_STORED = "instance.stored"
    INSTANCE_REFUSED = "instance.refused"
    SERIES_STATE = "series.state"
    JOB_START = "job.start"
    JOB_FINISH = "job.finish"
    JOB_FAIL = "job.fail"
    OUTPUT_WRITTEN = "output.written"
    SEND_ATTEMPT = "send.attempt"
    OUTBOX_RETRY = "outbox.retry"
    OUTBOX_DISCARD = "outbox.discard"
    JOB_RETRY = "job.retry"
    RETENTION = "retention.delete"
    NODE_START = "node.start"
    NODE_STOP = "node.stop"
    NOTIFY = "notify.send"


_BATCHED = "dicom_node.audit.batched"  # session.info key: events awaiting one INSERT

#: ``pg_advisory_xact_lock`` key of the audit chain ("dcmaudit"): on PostgreSQL every
#: audited write transaction, of every process and node, holds it from its start to its
#: commit, as SQLite's BEGIN IMMEDIATE holds the write lock.
AUDIT_LOCK_KEY = 0x64636D6175646974


def _digest(prev: str, at: datetime, kind: str, outcome: str, study: str, series: str,
            sop: str, peer: str, detail: str, node: str = "") -> str:
    fields = (prev, at.isoformat(), kind, outcome, study, series, sop, peer, detail)
    # the node only when there is one: the events from before the node column keep theirs
    text = ("node|" + json.dumps([*fields, node], ensure_ascii=False) if node
            else "|".join(fields))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AuditLog:
    """Writes audit events, and owns the node's write transactions.

    One re-entrant lock keeps the hash chain linear across threads. Every transaction
    that writes and records an event takes that lock *before* it writes (use
    :meth:`transaction`): taking it after a write would hold the database's write
    lock while waiting for ours, and another thread could hold ours while waiting for
    the database's.
    """

    def __init__(self, sessions: sessionmaker[Session], shared: bool = True,
                 node: str = "") -> None:
        """``node``: the name every event of this log carries (the process's heartbeat
        name, :func:`dicom_node.ops.heartbeat.node_name`)."""
        self._sessions = sessions
        self.node = node
        self._lock = threading.RLock()
        self._last_hash: str | None = None
        # Other processes (``dicom-node receive``, ``dicom-node outbox retry``, other
        # nodes) append to the same chain: every transaction takes the chain's lock first
        # (SQLite: BEGIN IMMEDIATE, the database's write lock; PostgreSQL: the advisory
        # transaction lock AUDIT_LOCK_KEY) and re-reads the chain's end. On PostgreSQL the
        # lock also keeps audit ids in commit order: ids are drawn from the sequence under
        # the lock and the lock is released only after the commit is visible, so a reader
        # (the notification cursor, ``id > last_audit_id``) never sees a later id before an
        # earlier one commits. ``shared=False`` only for a database no other process
        # writes to.
        self.shared = shared

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session for one write transaction, committed on success (with every event
        recorded in it); rolled back, events included, on an exception."""
        with self._lock, self._sessions() as session:
            try:
                if self.shared:
                    dialect = session.get_bind().dialect.name
                    if dialect == "sqlite":
                        session.connection().exec_driver_sql("BEGIN IMMEDIATE")
                    elif dialect == "postgresql":
                        session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                        {"key": AUDIT_LOCK_KEY})
                    self._last_hash = None
                yield session
                self._insert_batched(session)
                session.commit()
            except BaseException:
                self._last_hash = None  # re-read the chain's end from the database
                raise

    def record(self, kind: str, *, outcome: str = "ok", study_uid: str = "",
               series_uid: str = "", sop_uid: str = "", peer: str = "",
               **detail: Any) -> None:
        """Append one event in its own transaction."""
        detail_text = json.dumps(detail, sort_keys=True, default=str) if detail else ""
        with self.transaction() as session:
            self._append(session, kind, outcome, study_uid, series_uid, sop_uid, peer, detail_text)

    def record_in(self, session: Session, kind: str, *, outcome: str = "ok",
                  study_uid: str = "", series_uid: str = "", sop_uid: str = "",
                  peer: str = "", **detail: Any) -> None:
        """Append one event to the caller's transaction (a session from
        :meth:`transaction`): the change and the event that records it commit together."""
        detail_text = json.dumps(detail, sort_keys=True, default=str) if detail else ""
        with self._lock:
            self._append(session, kind, outcome, study_uid, series_uid, sop_uid, peer, detail_text)

    def record_batched_in(self, session: Session, kind: str, *, outcome: str = "ok",
                          study_uid: str = "", series_uid: str = "", sop_uid: str = "",
                          peer: str = "", **detail: Any) -> None:
        """As :meth:`record_in`, without flushing each event: the events of a batch are
        inserted together at commit, in the order they were recorded."""
        detail_text = json.dumps(detail, sort_keys=True, default=str) if detail else ""
        with self._lock:
            self._append(session, kind, outcome, study_uid, series_uid, sop_uid, peer,
                         detail_text, flush=False)

    def _append(self, session: Session, kind: str, outcome: str, study: str, series: str,
                sop: str, peer: str, detail: str, flush: bool = True) -> None:
        if self._last_hash is None:
            last = session.scalars(
                select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).first()
            self._last_hash = last or GENESIS
        at = utcnow()
        digest = _digest(self._last_hash, at, kind, outcome, study, series, sop, peer, detail,
                         self.node)
        row: dict[str, Any] = {"at": at, "kind": kind, "outcome": outcome, "study_uid": study,
                               "series_uid": series, "sop_uid": sop, "peer": peer,
                               "detail": detail, "prev_hash": self._last_hash, "hash": digest}
        if self.node:  # a log without a node writes as before 0004 (the column's default)
            row["node"] = self.node
        self._last_hash = digest
        if not flush:
            # One multi-row INSERT per transaction instead of an ORM object per event.
            session.info.setdefault(_BATCHED, []).append(row)
            return
        self._insert_batched(session)  # earlier events first: ids follow the chain
        # A Core INSERT of exactly these columns (the ORM would ask for the node's server
        # default back): a log without a node writes to a database before 0004 too.
        session.execute(insert(AuditEvent), [row])

    @staticmethod
    def _insert_batched(session: Session) -> None:
        rows = session.info.pop(_BATCHED, None)
        if rows:
            session.execute(insert(AuditEvent), rows)


@dataclass(frozen=True)
class ChainCheck:
    events: int
    first_broken_id: int | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.first_broken_id is None


def verify_chain(session: Session) -> ChainCheck:
    prev = GENESIS
    count = 0
    for event in session.scalars(select(AuditEvent).order_by(AuditEvent.id)).yield_per(1000):
        count += 1
        if event.prev_hash != prev:
            return ChainCheck(count, event.id, "prev_hash does not match the previous event")
        at = as_utc(event.at)
        expected = _digest(prev, at, event.kind, event.outcome, event.study_uid,
                           event.series_uid, event.sop_uid, event.peer, event.detail,
                           event.node)
        if expected != event.hash:
            return ChainCheck(count, event.id, "content does not match its hash")
        prev = event.hash
    return ChainCheck(count, None)


def recent_events(session: Session, *, limit: int = 50, study_uid: str | None = None,
                  series_uid: str | None = None, kind: str | None = None,
                  series_uids: Collection[str] | None = None) -> Sequence[AuditEvent]:
    """The newest ``limit`` events (oldest first), filtered; ``series_uids`` matches any of
    several series (a received series and the outputs written from it)."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if study_uid:
        query = query.where(AuditEvent.study_uid == study_uid)
    if series_uid:
        query = query.where(AuditEvent.series_uid == series_uid)
    if series_uids is not None:
        query = query.where(AuditEvent.series_uid.in_(series_uids))
    if kind:
        query = query.where(AuditEvent.kind.startswith(kind))
    return list(reversed(session.scalars(query).all()))


#: Kinds recorded once per instance: collapsed by :func:`collapse_events`.
PER_INSTANCE_KINDS = frozenset({AuditKind.INSTANCE_STORED, AuditKind.INSTANCE_REFUSED,
                                AuditKind.SEND_ATTEMPT})
#: Detail fields that differ from instance to instance (left out of a collapsed line).
PER_INSTANCE_FIELDS = frozenset({"bytes", "attempt"})


@dataclass
class EventGroup:
    """One line of the audit listing: an event, or (``count`` > 1) the per-instance events
    of one kind, outcome, series, peer (one association, or one destination) and node that say
    the same thing. ``detail`` leaves out what differs per instance."""

    first: AuditEvent
    last_at: datetime
    count: int
    detail: str


def _shared_detail(detail: str) -> str:
    if not detail:
        return ""
    try:
        fields = json.loads(detail)
    except ValueError:
        return detail
    if not isinstance(fields, dict):
        return detail
    return json.dumps({k: v for k, v in fields.items() if k not in PER_INSTANCE_FIELDS},
                      sort_keys=True, default=str)


def collapse_events(events: Sequence[AuditEvent]) -> list[EventGroup]:
    """Per-instance events (instance stored or refused, send attempts) collapsed into one
    group per kind, outcome, series, peer, node and shared detail, placed where its first event
    was; every other event is a group of its own. ``events`` oldest first."""
    groups: list[EventGroup] = []
    open_groups: dict[tuple[str, ...], EventGroup] = {}
    for event in events:
        if event.kind not in PER_INSTANCE_KINDS:
            groups.append(EventGroup(event, event.at, 1, event.detail))
            continue
        detail = _shared_detail(event.detail)
        key = (event.kind, event.outcome, event.study_uid, event.series_uid, event.peer,
               event.node, detail)
        group = open_groups.get(key)
        if group is None:
            group = open_groups[key] = EventGroup(event, event.at, 0, detail)
            groups.append(group)
        group.count += 1
        group.last_at = event.at
    return groups
