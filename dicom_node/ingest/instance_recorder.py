"""Records received instances in the database, in batches, off the C-STORE path.

The C-STORE handler makes the instance durable on disk (fsync + rename into
``incoming/``) and then hands a :class:`ReceivedInstance` to the recorder, which
writes the instance row, its series' bookkeeping and the audit event in one
transaction per batch (group commit). Whatever arrived while a batch was being
committed forms the next batch, so a busy receiver commits a few times per
second instead of once per instance, and a quiet one commits each instance
within milliseconds.

Nothing is lost if the node dies between the file and its row: at start-up
:func:`unrecorded_files` finds every file in ``incoming/`` without a row and the
recorder records it (audited as ``recovered``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from dicom_node.series.tracking import reopen
from storage.audit import AuditKind, AuditLog
from storage.file_store import FileStore, fsync_file, unchanged_for
from storage.group_commit import GroupCommitter
from storage.models import Instance, Series, SeriesState, as_utc

log = logging.getLogger(__name__)

#: Most instances committed in one transaction.
MAX_BATCH = 512
#: After the first instance of a batch, wait at most this long for more (a release
#: cuts it short), so one sender's stream commits a few times a second, not per instance.
LINGER_S = 0.05
#: Wait before retrying a batch whose transaction failed (database locked, disk full).
RETRY_DELAY_S = 1.0


@dataclass(frozen=True)
class ReceivedInstance:
    """What the handler learnt about one instance it made durable."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    patient_id: str
    accession_number: str
    modality: str
    description: str
    instance_number: int | None
    position_mm: float | None
    images_in_acquisition: int | None
    calling_ae: str
    peer_address: str
    peer: str
    association_id: int | None
    received_at: datetime
    recovered: bool = False
    needs_sync: bool = False  # the handler did not fsync it: the recorder does
    #: byte for byte the file already stored under its UIDs (a resend): recorded as
    #: unchanged, and never reopens its series
    identical: bool = False


class InstanceRecorder:
    """Commits received instances in batches on a thread of its own
    (:class:`storage.group_commit.GroupCommitter`)."""

    def __init__(self, audit: AuditLog, max_batch: int = MAX_BATCH,
                 linger_s: float = LINGER_S) -> None:
        self._audit = audit
        # A batch that keeps failing while the node stops is given up: its files are in
        # incoming/ and the next start records them (unrecorded_files).
        self._commits: GroupCommitter[ReceivedInstance] = GroupCommitter(
            self.record, name="instance-recorder", linger_s=linger_s, max_batch=max_batch,
            retry_delay_s=RETRY_DELAY_S)

    def start(self) -> None:
        self._commits.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Commit what is queued, then end the thread."""
        self._commits.stop(timeout_s)

    def submit(self, item: ReceivedInstance) -> None:
        self._commits.submit(item)

    @property
    def pending(self) -> int:
        return self._commits.pending

    @property
    def last_error(self) -> str:
        return self._commits.last_error

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted so far is committed; False on timeout."""
        return self._commits.flush(timeout_s)

    def record(self, batch: list[ReceivedInstance]) -> None:
        """Make the batch's files durable, then record it in one transaction (also usable
        directly, e.g. in tests)."""
        for item in batch:
            if item.needs_sync:
                fsync_file(Path(item.path))  # gone: replaced by a later copy, fsynced then
        stale: list[Path] = []
        with self._audit.transaction() as session:
            series_by_uid = _load_series(session, {item.series_uid for item in batch})
            instances = _load_instances(session, {item.sop_uid for item in batch})
            new_rows: dict[str, dict[str, Any]] = {}
            for item in batch:
                known = instances.get(item.sop_uid)
                if item.identical and ((known is not None and known.path == item.path)
                                       or item.sop_uid in new_rows):
                    self._audit.record_batched_in(
                        session, AuditKind.INSTANCE_STORED, study_uid=item.study_uid,
                        series_uid=item.series_uid, sop_uid=item.sop_uid, peer=item.peer,
                        bytes=item.size_bytes, unchanged="identical to the stored instance")
                    continue
                series = series_by_uid.get(item.series_uid)
                if series is None:
                    series = _new_series(item)
                    session.add(series)
                    session.flush()
                    series_by_uid[item.series_uid] = series
                    self._audit.record_in(session, AuditKind.SERIES_STATE,
                                          study_uid=item.study_uid, series_uid=item.series_uid,
                                          peer=item.peer, to=SeriesState.RECEIVING,
                                          reason="first instance")
                elif series.state != SeriesState.RECEIVING:
                    reopen(self._audit, session, series, peer=item.peer)
                series.last_received_at = max(as_utc(series.last_received_at), item.received_at)
                if item.calling_ae:
                    series.calling_ae = item.calling_ae
                    series.peer_address = item.peer_address
                duplicate, moved_from = False, ""
                instance = instances.get(item.sop_uid)
                row = new_rows.get(item.sop_uid)
                if instance is not None:
                    duplicate = True
                    if instance.series_id != series.id:
                        # The same SOP Instance UID re-sent in another series: it moves.
                        moved_from = _move(session, instance.series_id, series)
                        instance.series_id = series.id
                    if instance.path and instance.path != item.path:
                        stale.append(Path(instance.path))
                    _fill(instance, item)
                elif row is not None:  # twice in this batch
                    duplicate = True
                    if row["series_id"] != series.id:
                        moved_from = _move(session, row["series_id"], series)
                    if row["path"] != item.path:
                        stale.append(Path(row["path"]))
                    row.update(_row(item, series.id))
                else:
                    new_rows[item.sop_uid] = _row(item, series.id)
                    series.instance_count += 1
                detail: dict[str, Any] = {"bytes": item.size_bytes, "replaced": duplicate}
                if moved_from:
                    detail["moved_from_series"] = moved_from
                if item.recovered:
                    detail["recovered"] = "file without a database row found at start-up"
                self._audit.record_batched_in(session, AuditKind.INSTANCE_STORED,
                                      study_uid=item.study_uid, series_uid=item.series_uid,
                                      sop_uid=item.sop_uid, peer=item.peer, **detail)
            if new_rows:  # one multi-row INSERT, not an ORM object per instance
                session.execute(insert(Instance), list(new_rows.values()))
        for old_file in stale:  # after the commit: no row points at it any more
            old_file.unlink(missing_ok=True)


def _load_series(session: Session, uids: set[str]) -> dict[str, Series]:
    rows = session.scalars(select(Series).where(Series.series_uid.in_(uids))).all()
    return {row.series_uid: row for row in rows}


def _load_instances(session: Session, uids: set[str]) -> dict[str, Instance]:
    found: dict[str, Instance] = {}
    ordered = sorted(uids)
    for start in range(0, len(ordered), 500):  # stay under SQLite's variable limit
        chunk = ordered[start : start + 500]
        for row in session.scalars(select(Instance).where(Instance.sop_uid.in_(chunk))):
            found[row.sop_uid] = row
    return found


def _new_series(item: ReceivedInstance) -> Series:
    return Series(series_uid=item.series_uid, study_uid=item.study_uid,
                  patient_id=item.patient_id, accession_number=item.accession_number,
                  modality=item.modality, description=item.description,
                  calling_ae=item.calling_ae, peer_address=item.peer_address,
                  state=SeriesState.RECEIVING, first_received_at=item.received_at,
                  last_received_at=item.received_at, updated_at=item.received_at)


def _fill(instance: Instance, item: ReceivedInstance) -> None:
    instance.path = item.path
    instance.size_bytes = item.size_bytes
    instance.transfer_syntax_uid = item.transfer_syntax_uid
    instance.instance_number = item.instance_number
    instance.position_mm = item.position_mm
    instance.images_in_acquisition = item.images_in_acquisition
    if item.association_id is not None:
        instance.association_id = item.association_id
    instance.received_at = item.received_at


def _row(item: ReceivedInstance, series_id: int) -> dict[str, Any]:
    """The instance row of a new instance, for a bulk INSERT."""
    return {"sop_uid": item.sop_uid, "series_id": series_id, "path": item.path,
            "sop_class_uid": item.sop_class_uid,
            "transfer_syntax_uid": item.transfer_syntax_uid, "size_bytes": item.size_bytes,
            "instance_number": item.instance_number, "position_mm": item.position_mm,
            "images_in_acquisition": item.images_in_acquisition,
            "association_id": item.association_id, "received_at": item.received_at}


def _move(session: Session, old_series_id: int, new_series: Series) -> str:
    """Count an instance out of its old series and into ``new_series``; the old UID."""
    old_series = session.get(Series, old_series_id)
    new_series.instance_count += 1
    if old_series is None:
        return ""
    old_series.instance_count -= 1
    return old_series.series_uid


def unrecorded_files(session: Session, store: FileStore, older_than_s: float = 0.0
                     ) -> Iterator[Path]:
    """Files in ``incoming/`` that no instance row points at (a crash after the file was
    made durable and before its row was committed). With ``older_than_s``, only files
    unchanged for that long: a newer one may be a live receiver's, its row not yet
    committed."""
    if not store.incoming.is_dir():
        return
    candidates = [str(path) for path in sorted(store.incoming.glob("*/*/*.dcm"))
                  if older_than_s <= 0 or unchanged_for(path, older_than_s)]
    for start in range(0, len(candidates), 500):  # only the candidates' rows, not all
        chunk = candidates[start : start + 500]
        known = set(session.scalars(select(Instance.path).where(Instance.path.in_(chunk))))
        for path in chunk:
            if path not in known:
                yield Path(path)
