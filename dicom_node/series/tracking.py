"""The series state machine: the one place that changes ``series.state``.

    receiving -> ready -> queued -> running -> done | skipped | failed
        ^                                        |
        +------------- late instance ------------+   (reopens with version + 1)

Every change is :func:`set_state`: the row and its ``series.state`` audit event in
one transaction, so a restart resumes exactly where the node stopped. The periodic
steps take only what they need (config, sessions, audit), not the running node:

- :func:`sweep`: receiving -> ready (quiet, or geometrically complete)
- :func:`triage`: ready -> queued (an axial T1C) or skipped (the reason)
- :func:`recover`: at start-up, running -> queued (the node died in the job)
- :func:`reopen`: a late instance puts a ready/queued/running/finished series back to
  receiving (the instance recorder calls it)
- a job moves queued -> running -> done/skipped/failed (:mod:`dicom_node.jobs`)
- :func:`reprocess` (``dicom-node reprocess``): a finished series -> ready, version + 1
- :func:`discard` (``dicom-node discard``): any series -> discarded (no job, nothing sent)
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.errors import RequestRefused
from dicom_node.series.selection import Selection, select_series
from storage.audit import AuditKind, AuditLog
from storage.models import (
    FINISHED_STATES,
    AuditEvent,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    as_utc,
    utcnow,
)
from storage.models import Association as AssociationRow

log = logging.getLogger(__name__)

def set_state(audit: AuditLog, session: Session, series: Series, state: SeriesState,
              reason: str, *, peer: str = "", **detail: Any) -> None:
    """Change a series' state and audit it, in the caller's transaction."""
    previous = series.state
    series.state = state
    series.state_reason = reason
    series.updated_at = utcnow()
    audit.record_in(session, AuditKind.SERIES_STATE, study_uid=series.study_uid,
                    series_uid=series.series_uid, peer=peer, to=state, previous=previous,
                    reason=reason, version=series.version, **detail)
    if state in _LOGGED:  # the operator's console: one line per series milestone
        log.log(logging.WARNING if state == SeriesState.FAILED else logging.INFO,
                "series %s %s: %s", series_label(series), state, reason)


#: The states the application log announces (patient-free; the audit has everything).
_LOGGED = frozenset({SeriesState.READY, SeriesState.SKIPPED, SeriesState.DONE,
                     SeriesState.FAILED, SeriesState.DISCARDED})


def series_label(series: Series) -> str:
    """How the log names a series without patient data: accession number (if any), the
    tail of the Series Instance UID, the version after the first, the instance count."""
    parts = [f"acc {series.accession_number}"] if series.accession_number else []
    parts.append(f"...{series.series_uid[-12:]}")
    if series.version > 1:
        parts.append(f"v{series.version}")
    parts.append(f"{series.instance_count} instances")
    return "[" + ", ".join(parts) + "]"


def reopen(audit: AuditLog, session: Session, series: Series, peer: str = "") -> None:
    """A late instance arrived for a series past ``receiving``: it receives again, and a
    finished one gets a new version (its outputs will supersede the earlier set). So does
    a running one: its job holds the old version and may commit nothing (it would be a
    result of fewer instances, and a second job of the same version would follow: the
    job checks the version where it commits, :class:`dicom_node.errors.Superseded`)."""
    if series.state in FINISHED_STATES or series.state == SeriesState.RUNNING:
        series.version += 1
    set_state(audit, session, series, SeriesState.RECEIVING, "late instance arrived",
              peer=peer)


def reprocess(audit: AuditLog, session: Session, series: Series, requested_by: str) -> None:
    """Run the node's job on a finished (or discarded) series again, as if it had changed:
    version + 1, so the job writes a new result set (new UIDs, series numbers + 10 per
    version, an SR that supersedes the previous one) that the outbox sends like any other;
    the earlier set stays where it was delivered. The series goes to ``ready``: the
    running node's triage selects it again (with the config it runs now) and queues it.

    Raises :class:`RequestRefused` for a series still on its way through the pipeline or
    whose received instances retention has deleted."""
    if series.state == SeriesState.RUNNING:
        raise RequestRefused(f"series {series.series_uid} is being processed now (job "
                             "running); reprocess it once it has finished")
    if series.state not in FINISHED_STATES:
        raise RequestRefused(f"series {series.series_uid} is {series.state}: it will be "
                             "processed anyway, there is nothing to redo yet")
    gone = session.scalar(select(func.count()).select_from(Instance).where(
        Instance.series_id == series.id, Instance.path == ""))
    if gone:
        raise RequestRefused(f"series {series.series_uid}: {gone} of its received instances "
                             "were deleted by retention (retention.incoming_h); send the "
                             "series again from the PACS instead")
    series.version += 1
    set_state(audit, session, series, SeriesState.READY,
              f"reprocess requested by {requested_by}", requested_by=requested_by)


def discard(audit: AuditLog, session: Session, series: Series, requested_by: str) -> str:
    """Stop processing a series: it leaves the queue (a job running on it finishes, but
    queues nothing for sending: :func:`dicom_node.outbox.enqueue.enqueue_outputs` checks
    the state in its transaction). The caller drops its outbox entries in the same
    transaction. Returns the state it had. A new instance (not a byte-identical resend)
    reopens it as for any finished series; :func:`reprocess` runs it again."""
    if series.state == SeriesState.DISCARDED:
        raise RequestRefused(f"series {series.series_uid} is already discarded "
                             f"({series.state_reason})")
    previous = series.state
    set_state(audit, session, series, SeriesState.DISCARDED,
              f"discarded by {requested_by}", requested_by=requested_by)
    return previous


def geometrically_complete(positions: list[float | None], images_in_acquisition: int | None,
                           min_slices: int) -> bool:
    """Contiguous slice positions at one constant spacing, count consistent with the acquisition."""
    if len(positions) < max(2, min_slices) or any(p is None for p in positions):
        return False
    if images_in_acquisition and len(positions) != images_in_acquisition:
        return False
    ordered = sorted(p for p in positions if p is not None)
    gaps = [b - a for a, b in itertools.pairwise(ordered)]
    spacing = sorted(gaps)[len(gaps) // 2]
    if spacing <= 0:
        return False
    return all(abs(gap - spacing) <= 0.01 * spacing + 1e-3 for gap in gaps)


def sweep(config: NodeConfig, audit: AuditLog) -> int:
    """receiving -> ready: quiet for ``stable_after_s``, or geometrically complete and
    quiet for ``complete_grace_s``. Returns how many series became ready."""
    cfg = config.series
    now = utcnow()
    cutoff = now - timedelta(seconds=cfg.stable_after_s)
    grace_cutoff = now - timedelta(seconds=cfg.complete_grace_s)
    changed = 0
    with audit.transaction() as session:
        candidates = session.scalars(select(Series).where(
            Series.state == SeriesState.RECEIVING, Series.last_received_at <= grace_cutoff)).all()
        for series in candidates:
            quiet = as_utc(series.last_received_at) <= cutoff
            complete = _complete(session, series, config.selection.min_slices)
            if quiet and not complete and _interrupted(session, series):
                waited = (now - as_utc(series.last_received_at)).total_seconds()
                if waited < cfg.interrupted_wait_s:
                    continue  # the sender's resend will complete it
                reason = (f"no new instance for {waited:.0f} s after an interrupted "
                          f"transfer (interrupted_wait_s {cfg.interrupted_wait_s:g})")
            elif quiet:
                reason = f"no new instance for {cfg.stable_after_s:g} s"
            elif cfg.complete_grace_s > 0 and complete:
                reason = (f"geometrically complete ({series.instance_count} contiguous slices), "
                          f"quiet for {cfg.complete_grace_s:g} s")
            else:
                continue
            set_state(audit, session, series, SeriesState.READY, reason,
                      instances=series.instance_count)
            changed += 1
    return changed


def _interrupted(session: Session, series: Series) -> bool:
    """Did any instance of the series arrive over a transfer that did not end in a
    release: an aborted association, one the node was stopped in, or a file recovered at
    start-up (no association)?"""
    return session.execute(
        select(Instance.id).outerjoin(AssociationRow,
                                      AssociationRow.id == Instance.association_id)
        .where(Instance.series_id == series.id,
               (Instance.association_id.is_(None))
               | AssociationRow.state.in_(("aborted", "interrupted")))
        .limit(1)).first() is not None


def _complete(session: Session, series: Series, min_slices: int) -> bool:
    rows = session.execute(select(Instance.position_mm, Instance.images_in_acquisition)
                           .where(Instance.series_id == series.id)).all()
    declared = {row[1] for row in rows if row[1]}
    return geometrically_complete([row[0] for row in rows],
                                  declared.pop() if len(declared) == 1 else None, min_slices)


def series_paths(session: Session, series: Series) -> list[Path]:
    return [Path(p) for p in session.scalars(
        select(Instance.path).where(Instance.series_id == series.id, Instance.path != "")).all()]


class Selections:
    """Triage's accepted selections, handed to the job that processes the series so it does
    not read every header again. Keyed by series id; valid only for the version and
    instance count it was made for (a late instance makes the job select again)."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[int, int, Selection]] = {}
        self._lock = threading.Lock()

    def keep(self, series: Series, selection: Selection) -> None:
        with self._lock:
            self._kept[series.id] = (series.version, series.instance_count, selection)

    def take(self, series_id: int, version: int, instance_count: int) -> Selection | None:
        with self._lock:
            kept = self._kept.pop(series_id, None)
        if kept is None or kept[:2] != (version, instance_count):
            return None
        return kept[2]


def triage(config: NodeConfig, sessions: sessionmaker[Session], audit: AuditLog,
           selections: Selections | None = None) -> int:
    """ready -> queued (axial T1C) or skipped (with the reason). Returns how many.

    The headers are read outside any write transaction, so ingest never waits on it.
    """
    changed = 0
    with sessions() as session:
        ready = [(series.id, series_paths(session, series), refused_instances(session, series))
                 for series in session.scalars(
                     select(Series).where(Series.state == SeriesState.READY)
                     .order_by(Series.last_received_at)).all()]
    for series_id, paths, refused in ready:
        if refused:  # a slice the sender meant to send is missing: never a partial result
            selection = Selection(False, f"{len(refused)} instance(s) of this series were "
                                         f"refused at receive and not stored since "
                                         f"(first: {refused[0][1]})")
        else:
            selection = select_series(paths, config.selection)
        with audit.transaction() as session:
            series = session.get(Series, series_id)
            if series is None or series.state != SeriesState.READY:
                continue  # a late instance reopened it meanwhile
            if selection.accepted:
                set_state(audit, session, series, SeriesState.QUEUED, selection.reason,
                          slices=len(selection.slices))
                if selections is not None:
                    selections.keep(series, selection)
            else:
                set_state(audit, session, series, SeriesState.SKIPPED, selection.reason)
            changed += 1
    return changed


def refused_instances(session: Session, series: Series) -> list[tuple[str, str]]:
    """(SOP Instance UID, reason) of each instance of the series the receiver refused and
    that has not been stored since (a resend that was accepted clears it)."""
    stored = set(session.scalars(select(Instance.sop_uid).where(
        Instance.series_id == series.id)).all())
    refused: dict[str, str] = {}
    for sop_uid, detail in session.execute(
            select(AuditEvent.sop_uid, AuditEvent.detail).where(
                AuditEvent.kind == AuditKind.INSTANCE_REFUSED,
                AuditEvent.series_uid == series.series_uid).order_by(AuditEvent.id)).all():
        if sop_uid and sop_uid not in stored and sop_uid not in refused:
            try:
                reason = str(json.loads(detail).get("reason", "")) if detail else ""
            except ValueError:
                reason = detail
            refused[sop_uid] = reason
    return list(refused.items())


def recover(audit: AuditLog, associations: bool = True, owner: str = "") -> int:
    """At start-up: this node's jobs left running by a crash (``owner``: its heartbeat
    name; jobs from before leases have none) are abandoned and their series go back to
    the queue, with any running series no running job holds; associations the node died
    in are marked interrupted (their series wait for a resend:
    ``series.interrupted_wait_s``). ``associations=False`` for a worker, which receives
    nothing: the associations open in the database are other nodes'. Other nodes' running
    jobs are left to their leases (:func:`take_over_expired`)."""
    with audit.transaction() as session:
        for row in (session.scalars(select(AssociationRow).where(
                AssociationRow.state == "accepted")).all() if associations else ()):
            row.state = "interrupted"
        for job in session.scalars(select(Job).where(
                Job.state == JobState.RUNNING, Job.owner.in_({owner, ""}))).all():
            job.state = JobState.ABANDONED
            job.finished_at = utcnow()
            job.error = "node stopped while the job ran"
        session.flush()
        held = select(Job.series_id).where(Job.state == JobState.RUNNING)
        stuck = session.scalars(select(Series).where(Series.state == SeriesState.RUNNING,
                                                     Series.id.not_in(held))).all()
        for series in stuck:
            set_state(audit, session, series, SeriesState.QUEUED, "resumed after restart")
        session.commit()
        return len(stuck)


def renew_leases(sessions: sessionmaker[Session], owner: str, lease_s: float) -> int:
    """The running jobs ``owner`` holds are held ``lease_s`` longer (each sweep)."""
    with sessions() as session:
        result = session.execute(
            update(Job).where(Job.owner == owner, Job.state == JobState.RUNNING)
            .values(lease_until=utcnow() + timedelta(seconds=lease_s)))
        session.commit()
        return int(getattr(result, "rowcount", 0) or 0)


def take_over_expired(audit: AuditLog, by: str) -> int:
    """Jobs whose lease expired (their node died or lost the database) are abandoned and
    their series queued again, for any worker to claim; the abandoned job can no longer
    commit (:class:`dicom_node.errors.LeaseLost`). Rows another node is taking over are
    skipped (``FOR UPDATE SKIP LOCKED`` on PostgreSQL). Returns how many."""
    now = utcnow()
    taken = 0
    with audit.transaction() as session:
        expired = session.scalars(select(Job).where(
            Job.state == JobState.RUNNING, Job.lease_until.is_not(None), Job.lease_until < now)
            .with_for_update(skip_locked=True)).all()
        for job in expired:
            job.state = JobState.ABANDONED
            job.finished_at = now
            job.error = f"lease of {job.owner} expired; taken over by {by}"
            session.flush()
            series = session.get(Series, job.series_id)
            # Queued again only if the dead job was the series' current version and no
            # other job runs it: a late instance may have made a newer version that
            # another worker is running now (it must not get a second job).
            other = session.scalar(select(Job.id).where(
                Job.series_id == job.series_id, Job.state == JobState.RUNNING).limit(1))
            if (series is not None and series.state == SeriesState.RUNNING
                    and job.series_version == series.version and other is None):
                set_state(audit, session, series, SeriesState.QUEUED,
                          f"taken over: the lease of {job.owner} on job {job.id} expired",
                          job=job.id, by=by)
            taken += 1
    return taken
