"""The outbox sender: C-STORE of queued outputs, per destination and batch.

Statuses are handled by class: success and warnings (B000, B006, B007) mark the
entry sent (warnings audited as such); refusals that will not change (A9xx, Cxxx,
0122) go straight to dead-letter; anything else, and any association failure, is
retried with exponential backoff and jitter until ``max_attempts`` or ``max_age_h``,
then dead-lettered. A DICOMweb destination gets the same handling from the per-instance
outcomes of its STOW-RS answers (:mod:`dicom_node.outbox.stow`). Each destination has
its own association, thread and retry
times: after a failed association all its due entries wait out the backoff (the
circuit is open) while the other destinations go on. A large batch is split into
contiguous shares sent over ``associations_per_destination`` parallel associations.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.association import Association
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Destination, NodeConfig
from dicom_node.errors import ConfigError
from dicom_node.net import dimse_status
from dicom_node.net.ae import (
    bound_blocking_io,
    keep_responses,
    new_ae,
    quiet_unnamed_connect_errors,
    set_nodelay,
)
from dicom_node.net.host_checks import connect_failure
from dicom_node.net.tls import TlsConfig, client_tls_args
from dicom_node.outbox.stow import StowUnavailable, store_instances
from storage.audit import AuditKind, AuditLog
from storage.group_commit import GroupCommitter
from storage.models import OutboxEntry, OutboxState, OutputInstance, Series, as_utc, utcnow

log = logging.getLogger(__name__)

# (outbox entry id, file path, SOP class, SOP instance UID, study UID, series UID)
_Work = tuple[int, str, str, str, str, str]


@dataclass(frozen=True)
class _Destination:
    name: str
    peer: str  # AE@host:port


def is_permanent_failure(status: int) -> bool:
    """Refusals and errors a retry will not change."""
    return ((status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000
            or status == dimse_status.SOP_CLASS_NOT_SUPPORTED)


class Sender:
    def __init__(self, config: NodeConfig, sessions: sessionmaker[Session],
                 audit: AuditLog, node_id: str = "",
                 stopping: threading.Event | None = None) -> None:
        """``node_id``: the name the entries this sender claims carry (its heartbeat's);
        ``stopping``, once set, ends a batch before its next entry (C-STORE) or request
        (STOW-RS): the rest of the batch is released for the next pass, not counted as an
        attempt."""
        self.config = config
        self.stopping = stopping or threading.Event()
        self._sessions = sessions
        self._audit = audit
        self.node_id = node_id
        self._lock = threading.Lock()
        # Process-wide in pynetdicom: a C-STORE from a file path streams the file's bytes
        # after its meta header instead of decoding the whole data set and encoding it
        # again (that was about a third of the sender's CPU time per instance). The
        # sender is the only part of the node that sends C-STOREs.
        _config.STORE_SEND_CHUNKED_DATASET = True
        quiet_unnamed_connect_errors()
        # the last reason a destination's pass could not send, for its log line
        self._last_failure: dict[str, str] = {}

    def backoff_s(self, attempts: int) -> float:
        cfg = self.config.outbox
        base = min(cfg.retry_max_s, cfg.retry_initial_s * (2 ** max(0, attempts - 1)))
        return float(base * random.uniform(0.8, 1.2))

    def send_due(self) -> int:
        """Send every due entry, each destination on its own thread, so a destination that
        hangs until its timeout does not hold up the others. Returns how many were stored."""
        with self._lock:
            with self._sessions() as session:
                due = session.execute(
                    select(OutboxEntry.destination).where(
                        OutboxEntry.state == OutboxState.PENDING,
                        OutboxEntry.next_attempt_at <= utcnow()).distinct()).scalars().all()
            if len(due) <= 1:
                return sum(self._send_destination(destination) for destination in due)
            with ThreadPoolExecutor(max_workers=len(due), thread_name_prefix="send") as pool:
                return sum(pool.map(self._send_destination, due))

    def claim(self, destination: str) -> list[Any]:
        """Claim a batch of due entries for this sender: locked with ``FOR UPDATE SKIP
        LOCKED`` (PostgreSQL: entries another sender is claiming are skipped, not waited
        for; SQLite: the write lock, BEGIN IMMEDIATE) and marked with this sender's name
        and a lease of ``outbox.lease_s``. An entry claimed by a sender that died is
        claimed again once its lease has expired; its outcome ends the claim."""
        cfg = self.config.outbox
        now = utcnow()
        with self._sessions() as session:
            if session.get_bind().dialect.name == "sqlite":
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            rows = session.execute(
                select(OutboxEntry.id, OutputInstance.path, OutputInstance.sop_class_uid,
                       OutputInstance.sop_uid, Series.study_uid, OutputInstance.series_uid,
                       OutboxEntry.ae_title, OutboxEntry.host, OutboxEntry.port)
                .join(OutputInstance, OutputInstance.id == OutboxEntry.output_id)
                .outerjoin(Series, Series.id == OutputInstance.source_series_id)
                .where(OutboxEntry.destination == destination,
                       OutboxEntry.state == OutboxState.PENDING,
                       OutboxEntry.next_attempt_at <= now,
                       or_(OutboxEntry.lease_until.is_(None), OutboxEntry.lease_until < now))
                .order_by(OutboxEntry.id).limit(cfg.batch_size)
                .with_for_update(of=OutboxEntry, skip_locked=True)).all()
            if rows:
                session.execute(update(OutboxEntry).where(
                    OutboxEntry.id.in_([r[0] for r in rows])).values(
                    claimed_by=self.node_id,
                    lease_until=now + timedelta(seconds=cfg.lease_s)))
            session.commit()
        return list(rows)

    def renew_claims(self) -> int:
        """The entries this sender holds are held ``outbox.lease_s`` longer (from its
        heartbeat): a long batch keeps its claim while the sender lives."""
        with self._sessions() as session:
            result = session.execute(update(OutboxEntry).where(
                OutboxEntry.claimed_by == self.node_id, OutboxEntry.lease_until.is_not(None),
                OutboxEntry.state == OutboxState.PENDING).values(
                lease_until=utcnow() + timedelta(seconds=self.config.outbox.lease_s)))
            session.commit()
            return int(getattr(result, "rowcount", 0) or 0)

    def release_own_claims(self, entry_ids: list[int] | None = None) -> int:
        """The entries this sender (by name) claimed are due again at once, not after
        their lease: at start, all it claimed before it stopped or died; at a stop, the
        ``entry_ids`` of its batch it did not try (no attempt counted)."""
        claimed = [OutboxEntry.claimed_by == self.node_id, OutboxEntry.lease_until.is_not(None)]
        if entry_ids is not None:
            claimed.append(OutboxEntry.id.in_(entry_ids))
        with self._sessions() as session:
            result = session.execute(update(OutboxEntry).where(*claimed)
                                     .values(lease_until=None))
            session.commit()
            return int(getattr(result, "rowcount", 0) or 0)

    def _send_destination(self, destination: str) -> int:
        if self.stopping.is_set():
            return 0
        rows = self.claim(destination)
        if not rows:
            return 0
        work: list[_Work] = [(r[0], r[1], r[2], r[3], r[4] or "", r[5]) for r in rows]
        ae_title, host, port = rows[0][6], rows[0][7], rows[0][8]
        dest = next((d for d in self.config.destinations if d.name == destination), None)
        if dest is not None and dest.is_dicomweb:
            return self._send_dicomweb(work, dest)
        tls = dest.tls if dest is not None else TlsConfig()
        try:
            tls_args = client_tls_args(tls, host, section=f"destination {destination!r} tls")
        except ConfigError as exc:  # certificate files gone or replaced by bad ones
            self._retry_all([item[0] for item in work], f"TLS set-up failed: {exc}")
            return 0
        shares = self._shares(work)
        if len(shares) == 1:
            stored = self._send_over_association(shares[0], destination, ae_title, host, port,
                                                 tls_args, tls.enabled)
        else:
            # pynetdicom spends most of a C-STORE waiting on its polling reactors; a second
            # association overlaps that wait with the other's work and bookkeeping.
            with ThreadPoolExecutor(max_workers=len(shares),
                                    thread_name_prefix=f"send-{destination}") as pool:
                stored = sum(pool.map(lambda share: self._send_over_association(
                    share, destination, ae_title, host, port, tls_args, tls.enabled), shares))
        self._log_pass(stored, len(work), destination, f"{ae_title}@{host}:{port}")
        return stored

    def _send_dicomweb(self, work: list[_Work], dest: Destination) -> int:
        """STOW-RS of the due entries, ``max_instances_per_request`` per request; each
        instance's outcome handled like a C-STORE status (:mod:`dicom_node.outbox.stow`)."""
        where = _Destination(dest.name, dest.url)
        stored = 0
        outcomes = _OutcomeWriter(self._audit)
        try:
            with requests.Session() as http:
                size = dest.max_instances_per_request
                for start in range(0, len(work), size):
                    if self.stopping.is_set():  # as between C-STOREs: the rest is due again
                        self.release_own_claims([item[0] for item in work[start:]])
                        break
                    share = work[start : start + size]
                    present = []
                    for item in share:
                        if Path(item[1]).is_file():
                            present.append(item)
                        else:
                            outcomes.put(_Outcome(item[0], where, None,
                                                  f"output file missing: {item[1]}", True,
                                                  item[4], item[5], item[3]))
                    if not present:
                        continue
                    try:
                        answers = store_instances(http, dest, [(item[3], Path(item[1]))
                                                               for item in present])
                    except StowUnavailable as exc:
                        self._last_failure[dest.name] = str(exc)
                        self._retry_all([item[0] for item in present], str(exc))
                        continue
                    except OSError as exc:  # a credential file gone or unreadable
                        self._retry_all([item[0] for item in present],
                                        f"cannot read credentials: {exc}")
                        continue
                    for item, answer in zip(present, answers, strict=True):
                        entry_id, _path, _cls, sop_uid, study_uid, series_uid = item
                        if answer.stored:
                            stored += 1
                            outcomes.put(_Outcome(entry_id, where, answer.status, answer.reason,
                                                  False, study_uid, series_uid, sop_uid))
                        elif is_permanent_failure(answer.status):
                            outcomes.put(_Outcome(entry_id, where, answer.status,
                                                  f"refused by destination ({answer.reason})",
                                                  True, study_uid, series_uid, sop_uid))
                        else:
                            self._retry_all([entry_id], answer.reason, status=answer.status)
        finally:
            outcomes.close()
        self._log_pass(stored, len(work), dest.name, f"STOW-RS {dest.url}")
        return stored

    def _log_pass(self, stored: int, total: int, destination: str, where: str) -> None:
        """The operator's console: one line per pass and destination, named, with the
        failure the pass met (taken, so that a later pass does not repeat it)."""
        if stored == total:
            log.info("sent %d outputs to %s (%s)", stored, destination, where)
        elif self.stopping.is_set():
            failure = self._last_failure.pop(destination, None)
            log.info("stopping: sent %d of %d outputs to %s (%s); the rest are due again at "
                     "the next start%s", stored, total, destination, where,
                     f" (failure before the stop: {failure})" if failure else "")
        else:
            log.warning("sent %d of %d outputs to %s (%s): %s; the rest wait for a retry or "
                        "are dead letters (dicom-node outbox)", stored, total, destination,
                        where, self._last_failure.pop(destination, "see dicom-node outbox"))

    def _shares(self, work: list[_Work]) -> list[list[_Work]]:
        """Split a batch into contiguous shares, one per association."""
        cfg = self.config.outbox
        count = max(1, min(cfg.associations_per_destination,
                           len(work) // cfg.min_instances_per_association))
        size = -(-len(work) // count)
        return [work[i : i + size] for i in range(0, len(work), size)]

    def _send_over_association(self, work: list[_Work], destination: str, ae_title: str,
                               host: str, port: int, tls_args: Any, tls_enabled: bool) -> int:
        cfg = self.config.outbox
        sop_classes = sorted({item[2] for item in work})
        ae = new_ae(self.config.receiver.ae_title, acse_timeout_s=cfg.dimse_timeout_s,
                    dimse_timeout_s=cfg.dimse_timeout_s, network_timeout_s=cfg.dimse_timeout_s)
        # One context per transfer syntax: a peer picks one syntax per context, and a
        # pynetdicom peer prefers implicit VR, so a shared context would make every
        # (explicit VR) output be decoded and re-encoded before sending.
        for sop_class in sop_classes:
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
        if not assoc.is_established:
            reason = self._association_failure(assoc, host, port, tls_enabled)
            self._last_failure[destination] = reason
            self._retry_all([item[0] for item in work], f"{reason} ({ae_title}@{host}:{port})")
            return 0
        set_nodelay(assoc)
        # pynetdicom leaves the socket without a timeout after connecting: a destination
        # silent in the middle of a PDU would hold the send job (and a stop) for ever.
        bound_blocking_io(assoc, cfg.dimse_timeout_s)
        keep_responses(assoc)
        stored = 0
        where = _Destination(destination, f"{ae_title}@{host}:{port}")
        outcomes = _OutcomeWriter(self._audit)
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        try:
            for position, (entry_id, path, sop_class, sop_uid, study_uid, series_uid) in \
                    enumerate(work):
                if self.stopping.is_set():
                    self.release_own_claims([item[0] for item in work[position:]])
                    break
                if not assoc.is_established:
                    self._retry_all([entry_id], "association ended before sending")
                    continue
                if not Path(path).is_file():
                    outcomes.put(_Outcome(entry_id, where, None, f"output file missing: {path}",
                                          True, study_uid, series_uid, sop_uid))
                    continue
                if sop_class not in accepted:
                    # A PACS that does not take this SOP class (e.g. the KOS) refuses it on
                    # every attempt: dead-lettered now, the rest of the set still sent.
                    outcomes.put(_Outcome(
                        entry_id, where, None, f"the destination accepted no presentation "
                        f"context for SOP class {UID(sop_class).name} ({sop_class}): "
                        "add it to the destination's accepted SOP classes", True, study_uid,
                        series_uid, sop_uid))
                    continue
                try:
                    response = self._store(assoc, Path(path))
                except ValueError as exc:  # no context fits the file's transfer syntax
                    outcomes.put(_Outcome(entry_id, where, None, f"cannot send: {exc}", True,
                                          study_uid, series_uid, sop_uid))
                    continue
                status = int(response.Status) if "Status" in response else None
                if status is None:
                    self._retry_all([entry_id], "no response (timeout or abort)")
                elif dimse_status.is_stored(status):
                    stored += 1
                    outcomes.put(_Outcome(entry_id, where, status, "", False, study_uid,
                                          series_uid, sop_uid))
                elif is_permanent_failure(status):
                    outcomes.put(_Outcome(entry_id, where, status, "refused by destination",
                                          True, study_uid, series_uid, sop_uid))
                else:
                    self._retry_all([entry_id], f"status {dimse_status.describe(status)}",
                                    status=status)
        finally:
            outcomes.close()  # every outcome committed before the association ends
            if assoc.is_established:
                assoc.release()
        return stored

    def _association_failure(self, assoc: Association, host: str, port: int,
                             tls_enabled: bool) -> str:
        """Why an association was not established, as the admin needs it: pynetdicom
        reports a refused or unreachable connection as an aborted association, so the
        connection is tried again on its own to tell them apart."""
        if assoc.is_rejected:
            return ("association rejected by the destination (does it know the node's AE "
                    f"title {self.config.receiver.ae_title!r}, and is its own AE title right?)")
        # Briefly: a host that drops packets already cost the association's timeout.
        failure = connect_failure(host, port, min(self.config.outbox.dimse_timeout_s, 5.0))
        if failure is not None:
            return failure
        if tls_enabled:
            return "TLS handshake failed or the destination aborted the association"
        return "the destination accepted the connection, then aborted the association"

    @staticmethod
    def _store(assoc: Association, path: Path) -> Dataset:
        """C-STORE the file's bytes as written (streamed, not decoded); decode and
        re-encode only if the peer accepted no context in the file's transfer syntax."""
        try:
            return assoc.send_c_store(path)
        except ValueError:
            return assoc.send_c_store(dcmread(path))

    def _retry_all(self, entry_ids: list[int], reason: str, status: int | None = None) -> None:
        cfg = self.config.outbox
        with self._audit.transaction() as session:
            for entry_id in entry_ids:
                entry = session.get(OutboxEntry, entry_id)
                assert entry is not None
                entry.lease_until = None  # the claim ends with the outcome
                if entry.state != OutboxState.PENDING:
                    continue  # discarded meanwhile (dicom-node discard): it stays so
                entry.attempts += 1
                entry.last_status = status
                entry.last_error = reason
                age = utcnow() - as_utc(entry.created_at)
                if entry.attempts >= cfg.max_attempts or age > timedelta(hours=cfg.max_age_h):
                    entry.state = OutboxState.DEAD
                    reason_text = f"{reason}; dead-lettered after {entry.attempts} attempts"
                else:
                    entry.next_attempt_at = utcnow() + timedelta(
                        seconds=self.backoff_s(entry.attempts))
                    reason_text = reason
                output = session.get(OutputInstance, entry.output_id)
                source = session.get(Series, output.source_series_id) if output else None
                self._audit.record_in(
                    session, AuditKind.SEND_ATTEMPT, outcome="error",
                    study_uid=source.study_uid if source else "",
                    sop_uid=output.sop_uid if output else "",
                    series_uid=output.series_uid if output else "",
                    peer=f"{entry.ae_title}@{entry.host}:{entry.port}",
                    destination=entry.destination,
                    # no status: the C-STORE was never answered, or never sent at all
                    status=dimse_status.describe(status) if status is not None else "none",
                    attempt=entry.attempts, state=entry.state, reason=reason_text)



@dataclass(frozen=True)
class _Outcome:
    """A C-STORE that ended for good: stored (sent) or refused (dead)."""

    entry_id: int
    where: _Destination
    status: int | None
    reason: str
    dead: bool
    study_uid: str
    series_uid: str
    sop_uid: str


#: The outcome writer waits this long for more outcomes before a commit (group commit).
OUTCOME_LINGER_S = 0.05


class _OutcomeWriter:
    """Marks outbox entries sent or dead in a thread of its own, committing whatever has
    accumulated in one transaction (group commit), so the bookkeeping of one instance
    overlaps the C-STORE of the next. If the node dies, an outcome not yet committed
    means its instance is sent again: at most those of the last ``OUTCOME_LINGER_S``
    (a destination stores a re-sent SOP Instance UID once)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        # A failing batch is retried even while closing: an outcome is never dropped.
        self._commits: GroupCommitter[_Outcome] = GroupCommitter(
            self._write, name="send-outcomes", linger_s=OUTCOME_LINGER_S, max_batch=10_000,
            retry_while_stopping=True)
        self._commits.start()

    def put(self, outcome: _Outcome) -> None:
        self._commits.submit(outcome)

    def close(self) -> None:
        """Every outcome written (however long the database takes), then the thread ends."""
        while not self._commits.flush(60.0):
            log.error("send outcomes not yet recorded: %s; still retrying",
                      self._commits.last_error or "database busy")
        self._commits.stop()

    def _write(self, batch: list[_Outcome]) -> None:
        now = utcnow()
        with self._audit.transaction() as session:
            known = {entry_id: (count, state) for entry_id, count, state in session.execute(
                select(OutboxEntry.id, OutboxEntry.attempts, OutboxEntry.state)
                .where(OutboxEntry.id.in_([o.entry_id for o in batch])))}
            attempts = {entry_id: count for entry_id, (count, _state) in known.items()}
            # A refusal of an entry discarded meanwhile leaves it discarded (never a dead
            # letter that 'outbox retry' would send); a stored one is recorded as sent.
            session.execute(update(OutboxEntry), [
                {"id": o.entry_id, "attempts": attempts.get(o.entry_id, 0) + 1,
                 "last_status": o.status, "last_error": o.reason,
                 "state": (OutboxState.SENT if not o.dead else OutboxState.DISCARDED
                           if known.get(o.entry_id, (0, ""))[1] == OutboxState.DISCARDED
                           else OutboxState.DEAD),
                 "sent_at": None if o.dead else now, "lease_until": None} for o in batch])
            for o in batch:
                outcome = ("error" if o.dead else "warning"
                           if o.status is not None and dimse_status.is_warning(o.status)
                           else "ok")
                self._audit.record_batched_in(
                    session, AuditKind.SEND_ATTEMPT, outcome=outcome, study_uid=o.study_uid,
                    series_uid=o.series_uid, sop_uid=o.sop_uid, peer=o.where.peer,
                    destination=o.where.name, status=dimse_status.describe(o.status),
                    attempt=attempts.get(o.entry_id, 0) + 1,
                    state=OutboxState.DEAD if o.dead else OutboxState.SENT, reason=o.reason)
