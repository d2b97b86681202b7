"""The outbox sender: C-STORE of queued outputs, per destination and batch.

Statuses are handled by class: success and warnings (B000, B006, B007) mark the
entry sent (warnings audited as such); refusals that will not change (A9xx, Cxxx,
0122) go straight to dead-letter; anything else, and any association failure, is
retried with exponential backoff and jitter until ``max_attempts`` or ``max_age_h``,
then dead-lettered. Each destination has its own association, thread and retry
times: after a failed association all its due entries wait out the backoff (the
circuit is open) while the other destinations go on. A large batch is split into
contiguous shares sent over ``associations_per_destination`` parallel associations.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import dimse_status
from dicom_node.config import ConfigError, NodeConfig
from dicom_node.identity import apply_identity
from dicom_node.tls import TlsConfig, client_tls_args
from storage.audit import AuditKind, AuditLog
from storage.models import OutboxEntry, OutboxState, OutputInstance, Series, as_utc, utcnow

log = logging.getLogger(__name__)

# (outbox entry id, file path, SOP class, SOP instance UID, study UID, series UID)
_Work = tuple[int, str, str, str, str, str]


def is_permanent_failure(status: int) -> bool:
    """Refusals and errors a retry will not change."""
    return ((status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000
            or status == dimse_status.SOP_CLASS_NOT_SUPPORTED)


class Sender:
    def __init__(self, config: NodeConfig, sessions: sessionmaker[Session],
                 audit: AuditLog) -> None:
        self.config = config
        self._sessions = sessions
        self._audit = audit
        self._lock = threading.Lock()

    def backoff_s(self, attempts: int) -> float:
        cfg = self.config.outbox
        base = min(cfg.retry_max_s, cfg.retry_initial_s * (2 ** max(0, attempts - 1)))
        return base * random.uniform(0.8, 1.2)

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

    def _send_destination(self, destination: str) -> int:
        cfg = self.config.outbox
        with self._sessions() as session:
            entries = session.scalars(
                select(OutboxEntry).where(OutboxEntry.destination == destination,
                                          OutboxEntry.state == OutboxState.PENDING,
                                          OutboxEntry.next_attempt_at <= utcnow())
                .order_by(OutboxEntry.id).limit(cfg.batch_size)).all()
            if not entries:
                return 0
            work: list[_Work] = []
            for entry in entries:
                output = session.get(OutputInstance, entry.output_id)
                assert output is not None
                series = session.get(Series, output.source_series_id)
                work.append((entry.id, output.path, output.sop_class_uid, output.sop_uid,
                             series.study_uid if series else "", output.series_uid))
            first = entries[0]
            ae_title, host, port = first.ae_title, first.host, first.port
        dest = next((d for d in self.config.destinations if d.name == destination), None)
        tls = dest.tls if dest is not None else TlsConfig()
        try:
            tls_args = client_tls_args(tls, host, section=f"destination {destination!r} tls")
        except ConfigError as exc:  # certificate files gone or replaced by bad ones
            self._retry_all([item[0] for item in work], f"TLS set-up failed: {exc}")
            return 0
        shares = self._shares(work)
        if len(shares) == 1:
            return self._send_over_association(shares[0], ae_title, host, port, tls_args,
                                               tls.enabled)
        # pynetdicom spends most of a C-STORE waiting on its polling reactors; a second
        # association overlaps that wait with the other's work and bookkeeping.
        with ThreadPoolExecutor(max_workers=len(shares),
                                thread_name_prefix=f"send-{destination}") as pool:
            return sum(pool.map(lambda share: self._send_over_association(
                share, ae_title, host, port, tls_args, tls.enabled), shares))

    def _shares(self, work: list[_Work]) -> list[list[_Work]]:
        """Split a batch into contiguous shares, one per association."""
        cfg = self.config.outbox
        count = max(1, min(cfg.associations_per_destination,
                           len(work) // cfg.min_instances_per_association))
        size = -(-len(work) // count)
        return [work[i : i + size] for i in range(0, len(work), size)]

    def _send_over_association(self, work: list[_Work], ae_title: str, host: str, port: int,
                               tls_args: Any, tls_enabled: bool) -> int:
        cfg = self.config.outbox
        sop_classes = sorted({item[2] for item in work})
        ae = AE(ae_title=self.config.receiver.ae_title)
        apply_identity(ae)
        ae.acse_timeout = cfg.dimse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.dimse_timeout_s
        for sop_class in sop_classes:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
        if not assoc.is_established:
            reason = ("association rejected" if assoc.is_rejected else
                      "association aborted" if assoc.is_aborted else
                      "cannot connect or TLS handshake failed" if tls_enabled else
                      "cannot connect")
            self._retry_all([item[0] for item in work], f"{reason} ({ae_title}@{host}:{port})")
            return 0
        _nodelay(assoc)
        stored = 0
        try:
            for entry_id, path, _sop_class, sop_uid, study_uid, series_uid in work:
                if not assoc.is_established:
                    self._retry_all([entry_id], "association ended before sending")
                    continue
                if not Path(path).is_file():
                    self._finish(entry_id, None, f"output file missing: {path}", dead=True,
                                 study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid)
                    continue
                response = self._store(assoc, Path(path))
                status = int(response.Status) if "Status" in response else None
                if status is None:
                    self._retry_all([entry_id], "no response (timeout or abort)")
                elif dimse_status.is_stored(status):
                    stored += 1
                    self._finish(entry_id, status, "", study_uid=study_uid,
                                 series_uid=series_uid, sop_uid=sop_uid)
                elif is_permanent_failure(status):
                    self._finish(entry_id, status, "refused by destination", dead=True,
                                 study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid)
                else:
                    self._retry_all([entry_id], f"status {dimse_status.describe(status)}",
                                    status=status)
        finally:
            if assoc.is_established:
                assoc.release()
        return stored

    @staticmethod
    def _store(assoc: Association, path: Path) -> Dataset:
        """C-STORE the file's bytes as written; re-encode only if the peer accepted no
        context in the file's own transfer syntax."""
        try:
            return assoc.send_c_store(path)
        except ValueError:
            return assoc.send_c_store(dcmread(path))

    def _finish(self, entry_id: int, status: int | None, reason: str, *, dead: bool = False,
                study_uid: str = "", series_uid: str = "", sop_uid: str = "") -> None:
        with self._audit.transaction() as session:
            entry = session.get(OutboxEntry, entry_id)
            assert entry is not None
            entry.attempts += 1
            entry.last_status = status
            entry.last_error = reason
            if dead:
                entry.state = OutboxState.DEAD
            else:
                entry.state = OutboxState.SENT
                entry.sent_at = utcnow()
            outcome = ("error" if dead else
                       "warning" if status is not None and dimse_status.is_warning(status)
                       else "ok")
            self._audit.record_in(session, AuditKind.SEND_ATTEMPT, outcome=outcome,
                                  study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
                                  peer=f"{entry.ae_title}@{entry.host}:{entry.port}",
                                  destination=entry.destination,
                                  status=dimse_status.describe(status), attempt=entry.attempts,
                                  state=entry.state, reason=reason)

    def _retry_all(self, entry_ids: list[int], reason: str, status: int | None = None) -> None:
        cfg = self.config.outbox
        with self._audit.transaction() as session:
            for entry_id in entry_ids:
                entry = session.get(OutboxEntry, entry_id)
                assert entry is not None
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
                self._audit.record_in(
                    session, AuditKind.SEND_ATTEMPT, outcome="error",
                    sop_uid=output.sop_uid if output else "",
                    series_uid=output.series_uid if output else "",
                    peer=f"{entry.ae_title}@{entry.host}:{entry.port}",
                    destination=entry.destination, status=dimse_status.describe(status),
                    attempt=entry.attempts, state=entry.state, reason=reason_text)



def _nodelay(assoc: Association) -> None:
    """pynetdicom leaves Nagle on; small PDUs then wait for delayed ACKs."""
    sock = assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
