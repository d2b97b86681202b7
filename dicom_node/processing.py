"""The series jobs: completion, selection, and processing one T1C series.

Every step is a row change in the database with its audit event in the same
transaction, so a restart resumes exactly where the node stopped.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from pydicom import Dataset, dcmread
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.analysis.process import (
    Analysis,
    AnalysisProcessError,
    InlineAnalysis,
    TbrRequest,
)
from dicom_node.analysis.tbr import TbrResult
from dicom_node.analysis.uncertainty import Calibration, TbrInterval, lesion_intervals
from dicom_node.config import Destination, NodeConfig, OutputConfig
from dicom_node.inference.predictor import Prediction, Predictor
from dicom_node.series.selection import select_series
from dicom_node.series.volume import VolumeError, load_volume
from dicom_node.writers.provenance import Provenance
from dicom_node.writers.sc import ScSeries, encode
from dicom_node.writers.seg import make_seg
from dicom_node.writers.sr import make_sr
from dicom_node.writers.uids import derive_uid, source_fingerprint
from storage.audit import AuditKind, AuditLog
from storage.file_store import FileStore, atomic_write
from storage.models import Association as AssociationRow
from storage.models import (
    Instance,
    Job,
    OutboxEntry,
    OutboxState,
    OutputInstance,
    Series,
    SeriesState,
    as_utc,
    utcnow,
)

log = logging.getLogger(__name__)


# Slice 1 of the fusion series when the analysis failed (the job fails with the reason).


class SeriesSkipped(Exception):
    """The series is not something this node processes (reason in the message)."""


@dataclass
class NodeContext:
    """What the jobs share: config, database, audit log, file store, the warm model and
    where the TBR analysis runs."""

    config: NodeConfig
    sessions: sessionmaker[Session]
    audit: AuditLog
    store: FileStore
    predictor: Predictor
    analysis: Analysis = field(default_factory=InlineAnalysis)
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def provenance(self) -> Provenance:
        card = self.predictor.model.card
        return Provenance(manufacturer=self.config.output.manufacturer, model_name=card.name,
                          model_version=card.version,
                          weights_sha256=self.predictor.model.sha256,
                          institution_name=self.config.output.institution_name)


def set_state(ctx: NodeContext, session: Session, series: Series, state: str, reason: str,
              **detail: Any) -> None:
    """Change a series' state and audit it, in one commit."""
    previous = series.state
    series.state = state
    series.state_reason = reason
    series.updated_at = utcnow()
    ctx.audit.record_in(session, AuditKind.SERIES_STATE, study_uid=series.study_uid,
                        series_uid=series.series_uid, to=state, previous=previous,
                        reason=reason, version=series.version, **detail)


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


def sweep(ctx: NodeContext) -> int:
    """receiving -> ready: quiet for ``stable_after_s``, or geometrically complete and
    quiet for ``complete_grace_s``. Returns how many series became ready."""
    cfg = ctx.config.series
    now = utcnow()
    cutoff = now - timedelta(seconds=cfg.stable_after_s)
    grace_cutoff = now - timedelta(seconds=cfg.complete_grace_s)
    changed = 0
    with ctx.audit.transaction() as session:
        candidates = session.scalars(select(Series).where(
            Series.state == SeriesState.RECEIVING, Series.last_received_at <= grace_cutoff)).all()
        for series in candidates:
            quiet = as_utc(series.last_received_at) <= cutoff
            complete = _complete(session, series, ctx.config.selection.min_slices)
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
            set_state(ctx, session, series, SeriesState.READY, reason,
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


def triage(ctx: NodeContext) -> int:
    """ready -> queued (axial T1C) or skipped (with the reason). Returns how many.

    The headers are read outside any write transaction, so ingest never waits on it.
    """
    changed = 0
    with ctx.sessions() as session:
        ready = [(series.id, series_paths(session, series)) for series in session.scalars(
            select(Series).where(Series.state == SeriesState.READY)
            .order_by(Series.last_received_at)).all()]
    for series_id, paths in ready:
        selection = select_series(paths, ctx.config.selection)
        with ctx.audit.transaction() as session:
            series = session.get(Series, series_id)
            if series is None or series.state != SeriesState.READY:
                continue  # a late instance reopened it meanwhile
            if selection.accepted:
                set_state(ctx, session, series, SeriesState.QUEUED, selection.reason,
                          slices=len(selection.slices))
            else:
                set_state(ctx, session, series, SeriesState.SKIPPED, selection.reason)
            changed += 1
    return changed


def recover(ctx: NodeContext) -> int:
    """At start-up: series left running by a crash go back to the queue, and
    associations the node died in are marked interrupted (their series wait for a
    resend: ``series.interrupted_wait_s``)."""
    with ctx.audit.transaction() as session:
        for row in session.scalars(select(AssociationRow).where(
                AssociationRow.state == "accepted")).all():
            row.state = "interrupted"
        for job in session.scalars(select(Job).where(Job.state == "running")).all():
            job.state = "abandoned"
            job.finished_at = utcnow()
            job.error = "node stopped while the job ran"
        stuck = session.scalars(select(Series).where(Series.state == SeriesState.RUNNING)).all()
        for series in stuck:
            set_state(ctx, session, series, SeriesState.QUEUED, "resumed after restart")
        session.commit()
        return len(stuck)


def resolve_destination(ctx: NodeContext, dest: Destination,
                        series: Series) -> tuple[str, str, int] | None:
    """(AE title, host, port) for a destination; None if return-to-sender has no route."""
    if not dest.return_to_sender:
        return dest.ae_title, dest.host, dest.port
    peer = ctx.config.peer(series.calling_ae)
    if peer is None or peer.return_host is None or peer.return_port is None:
        return None
    return peer.ae_title, peer.return_host, peer.return_port


def process_next(ctx: NodeContext, on_queued: Callable[[], None] | None = None) -> bool:
    """Process the oldest queued series, if any. Returns whether one was processed.
    ``on_queued`` is called whenever outputs were queued for sending."""
    with ctx.audit.transaction() as session:
        series = session.scalars(select(Series).where(Series.state == SeriesState.QUEUED)
                                 .order_by(Series.updated_at).limit(1)).first()
        if series is None:
            return False
        job = Job(series_id=series.id, series_version=series.version, state="running",
                  device=str(ctx.predictor.device))
        session.add(job)
        session.flush()
        set_state(ctx, session, series, SeriesState.RUNNING, "inference started", job=job.id)
        ctx.audit.record_in(session, AuditKind.JOB_START, study_uid=series.study_uid,
                            series_uid=series.series_uid, job=job.id, device=job.device)
        series_id, job_id = series.id, job.id
    started = time.monotonic()
    try:
        outputs = run_series(ctx, series_id, job_id, on_queued)
    except SeriesSkipped as exc:
        finish(ctx, series_id, job_id, SeriesState.SKIPPED, str(exc), started)
    except VolumeError as exc:
        finish(ctx, series_id, job_id, SeriesState.FAILED, str(exc), started)
    except Exception as exc:  # job boundary: any failure is recorded, the worker goes on
        log.exception("job %d failed", job_id)
        finish(ctx, series_id, job_id, SeriesState.FAILED,
               f"{type(exc).__name__}: {exc}", started)
    else:
        finish(ctx, series_id, job_id, SeriesState.DONE,
               f"{outputs} outputs queued for sending", started)
    return True


def finish(ctx: NodeContext, series_id: int, job_id: int, state: str, reason: str,
           started: float) -> None:
    seconds = time.monotonic() - started
    with ctx.audit.transaction() as session:
        series = session.get(Series, series_id)
        job = session.get(Job, job_id)
        assert series is not None and job is not None
        job.state = "done" if state in (SeriesState.DONE, SeriesState.SKIPPED) else "failed"
        job.finished_at = utcnow()
        job.seconds = seconds
        job.error = "" if state == SeriesState.DONE else reason
        if series.state == SeriesState.RUNNING:  # a late instance may have reopened it
            set_state(ctx, session, series, state, reason, job=job_id)
        kind = AuditKind.JOB_FAIL if state == SeriesState.FAILED else AuditKind.JOB_FINISH
        ctx.audit.record_in(session, kind, outcome="error" if state == SeriesState.FAILED
                            else "ok", study_uid=series.study_uid, series_uid=series.series_uid,
                            job=job_id, seconds=round(seconds, 3), result=state, reason=reason)


def summary_lines(result: TbrResult, intervals: Sequence[TbrInterval] = (),
                  level: float = 0.0) -> list[str]:
    """The text on the first SC slice: the ratios, with their intervals when measured
    (then two short lines per lesion, so that a 256-pixel-wide slice holds them)."""
    by_lesion = {interval.lesion: interval for interval in intervals}
    lines = [f"TBR (synthetic uptake), threshold {result.threshold:g} x bg; "
             f"bg mean {result.background_mean:.2f}"]
    if not result.lesions:
        lines.append(result.finding[:1].upper() + result.finding[1:])
    for lesion in result.lesions[:3]:
        interval = by_lesion.get(lesion.number)
        if interval is None:
            lines.append(f"Lesion {lesion.number}: TBRmax {lesion.tbr_max:.2f}  "
                         f"TBRmean {lesion.tbr_mean:.2f}  {lesion.volume_ml:.1f} mL")
            continue
        lines.append(f"Lesion {lesion.number}{' EQUIVOCAL' if interval.equivocal else ''}: "
                     f"{lesion.volume_ml:.1f} mL, {level:.0%} intervals")
        lines.append(f" TBRmax {lesion.tbr_max:.2f} ({interval.tbr_max_low:.2f}-"
                     f"{interval.tbr_max_high:.2f}) TBRmean {lesion.tbr_mean:.2f} "
                     f"({interval.tbr_mean_low:.2f}-{interval.tbr_mean_high:.2f})")
    if len(result.lesions) > 3:
        lines.append(f"... {len(result.lesions) - 3} more lesion(s) in the SR")
    return lines


def run_series(ctx: NodeContext, series_id: int, job_id: int,
               on_queued: Callable[[], None] | None = None) -> int:
    """Inference, analysis and writing for one series; returns the outputs queued.

    The TBR analysis runs in the analysis process (:mod:`analysis_process`) while this
    thread writes SC slices 2..N and draws the uncertainty passes. Nothing is queued for
    sending until the whole set (SC, SEG, SR) is written: a job that fails anywhere
    sends nothing of its version, and the files it wrote are removed.
    """
    with ctx.sessions() as session:
        series = session.get(Series, series_id)
        assert series is not None
        paths = series_paths(session, series)
        version = series.version
        study_uid = series.study_uid
    selection = select_series(paths, ctx.config.selection)
    if not selection.accepted:
        raise SeriesSkipped(selection.reason)
    volume = load_volume(selection.slices)
    prediction = predict_with_retries(ctx, volume.pixels, series_id, job_id,
                                      slice_spacing_mm=volume.spacing_mm[0],
                                      slice_positions_mm=volume.positions_mm)
    analysis = ctx.analysis.submit(TbrRequest(
        prediction.uptake, volume.voxel_volume_ml, ctx.config.analysis.tbr_threshold,
        ctx.config.analysis.min_lesion_volume_ml, ctx.predictor.style.display_threshold,
        spacing_mm=volume.spacing_mm, t1c_grey=prediction.grey,
        columns_toward_patient_left=volume.slices[0].orientation[0] > 0,
        threads=ctx.config.analysis.thread_count()))
    provenance = ctx.provenance
    fingerprint = source_fingerprint(s.sop_uid for s in volume.slices)
    sha = provenance.weights_sha256
    labels = VersionLabels.of(version, ctx.config.output)

    def uid(kind: str, index: int = 0) -> UID:
        return derive_uid(fingerprint, sha, version, kind, index)

    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}
    sc = ScSeries(prediction.fusion_uint8(), [by_uid[info.sop_uid] for info in volume.slices],
                  volume.slices, uid("sc-series"),
                  [uid("sc", index) for index in range(len(volume.slices))],
                  labels.series_number_sc, provenance, labels.description_suffix)
    written: list[tuple[str, object, Path]] = []
    try:
        written.extend(write_sc(ctx, study_uid, sc, index) for index in range(1, len(sc)))
        samples = ctx.config.analysis.uncertainty_samples
        draws = None
        if samples >= 2 and ctx.predictor.model.card.output_kind == "uptake":
            # While the analysis process measures the ratios: the stochastic passes behind
            # each lesion's interval (dicom_node/analysis/uncertainty.py).
            draws = ctx.predictor.sample_uptake(prediction.grey, samples,
                                                slice_spacing_mm=volume.spacing_mm[0],
                                                slice_positions_mm=volume.positions_mm)
        limit_s = ctx.config.analysis.timeout_s
        try:
            result = analysis.result(timeout=limit_s)
        except TimeoutError as exc:
            ctx.analysis.abort()
            raise AnalysisProcessError(f"TBR analysis took longer than analysis.timeout_s "
                                       f"({limit_s:g} s) and was stopped") from exc
        calibration = Calibration.from_card(ctx.predictor.model.card.tbr_interval)
        intervals = lesion_intervals(draws, result, calibration) if draws is not None else []
        written.insert(0, write_sc(ctx, study_uid, sc, 0,
                                   summary_lines(result, intervals, calibration.level)))
        seg = make_seg(volume.datasets, result, uid("seg-series"), uid("seg"),
                       labels.series_number_seg, provenance, labels.description_suffix)
        written.append(("seg", seg, write_output(ctx, study_uid, seg, encode(seg))))
        sr = make_sr(volume.datasets, seg, result, uid("sr-series"), uid("sr"),
                     labels.series_number_sr, provenance,
                     supersedes=previous_reports(ctx, series_id, version), intervals=intervals,
                     interval_method=(calibration.method_text(samples) if draws is not None
                                      else ""),
                     description_suffix=labels.description_suffix)
        written.append(("sr", sr, write_output(ctx, study_uid, sr, encode(sr))))
    except BaseException:
        discard_unrecorded(ctx, [path for _, _, path in written])
        raise
    count = enqueue_outputs(ctx, series_id, job_id, version, written, result, intervals)
    if on_queued is not None:
        on_queued()
    return count


def discard_unrecorded(ctx: NodeContext, paths: list[Path]) -> None:
    """Remove what a failed job wrote: nothing of it reaches the outbox, nothing stays on
    disk (a file that an earlier, recorded run of the same version wrote is kept)."""
    with ctx.sessions() as session:
        recorded = set(session.scalars(select(OutputInstance.path).where(
            OutputInstance.path.in_([str(p) for p in paths]))).all()) if paths else set()
    for path in paths:
        if str(path) not in recorded:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class VersionLabels:
    """How a re-run's outputs tell themselves apart from the set they supersede in the
    viewer: version 1 keeps the configured series numbers and descriptions; version n
    adds 10 x (n - 1) to each number and " (v n)" to each description."""

    series_number_sc: int
    series_number_seg: int
    series_number_sr: int
    description_suffix: str

    @classmethod
    def of(cls, version: int, output: OutputConfig) -> VersionLabels:
        offset = 10 * (version - 1)
        return cls(output.series_number_sc + offset, output.series_number_sc + 2 + offset,
                   output.series_number_sr + offset, f" (v{version})" if version > 1 else "")


def write_output(ctx: NodeContext, study_uid: str, ds: Dataset, data: bytes) -> Path:
    """Write one output instance's bytes to its place in the store (atomically)."""
    path = ctx.store.output_path(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    atomic_write(path, data)
    return path


def write_sc(ctx: NodeContext, study_uid: str, sc: ScSeries, index: int,
             summary: list[str] | None = None,
             sop_uid: UID | None = None) -> tuple[str, object, Path]:
    ds = sc.instance(index, summary or (), sop_uid)
    return "sc", ds, write_output(ctx, study_uid, ds, sc.encode(ds))


def predict_with_retries(ctx: NodeContext, pixels: NDArray[np.float32], series_id: int,
                         job_id: int, slice_spacing_mm: float | None = None,
                         slice_positions_mm: NDArray[np.float64] | None = None) -> Prediction:
    """Run the model; after a failure (CUDA out of memory, timeout, any error) retry with
    half the batch size, up to ``model.retries`` times, then let the job fail."""
    batch = ctx.predictor.batch_size
    attempt = 0
    while True:
        try:
            return ctx.predictor.predict(pixels, batch_size=batch,
                                         timeout_s=ctx.config.model.timeout_s,
                                         slice_spacing_mm=slice_spacing_mm,
                                         slice_positions_mm=slice_positions_mm)
        except Exception as exc:  # inference boundary: retried, and every failure audited
            if attempt == ctx.config.model.retries:
                raise
            attempt += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            smaller = max(1, batch // 2)
            with ctx.audit.transaction() as session:
                series = session.get(Series, series_id)
                ctx.audit.record_in(session, AuditKind.JOB_RETRY, outcome="warning",
                                    study_uid=series.study_uid if series else "",
                                    series_uid=series.series_uid if series else "",
                                    job=job_id, batch_size=batch, next_batch_size=smaller,
                                    reason=f"{type(exc).__name__}: {exc}"[:500])
            batch = smaller


def previous_reports(ctx: NodeContext, series_id: int, version: int) -> list[Dataset]:
    """The SR of the newest earlier version of this series, which a new report supersedes."""
    if version <= 1:
        return []
    with ctx.sessions() as session:
        path = session.scalars(
            select(OutputInstance.path).where(OutputInstance.source_series_id == series_id,
                                              OutputInstance.kind == "sr",
                                              OutputInstance.series_version < version)
            .order_by(OutputInstance.series_version.desc()).limit(1)).first()
    if path is None or not Path(path).is_file():
        return []
    return [dcmread(path, stop_before_pixels=True)]


def _interval_fields(interval: TbrInterval | None) -> dict[str, Any]:
    if interval is None:
        return {}
    return {"tbr_max_interval": [round(interval.tbr_max_low, 3), round(interval.tbr_max_high, 3)],
            "tbr_mean_interval": [round(interval.tbr_mean_low, 3),
                                  round(interval.tbr_mean_high, 3)],
            "equivocal": interval.equivocal}


def enqueue_outputs(ctx: NodeContext, series_id: int, job_id: int, version: int,
                    written: list[tuple[str, object, Path]], result: TbrResult | None,
                    intervals: Sequence[TbrInterval] = ()) -> int:
    """Record outputs and their outbox rows (one per destination) in one transaction;
    the audit event carries the TBR findings (with their intervals) when ``result`` is
    given."""
    queued = 0
    with ctx.audit.transaction() as session:
        series = session.get(Series, series_id)
        assert series is not None
        routes = []
        for dest in ctx.config.destinations:
            route = resolve_destination(ctx, dest, series)
            if route is None:
                ctx.audit.record_in(session, AuditKind.SEND_ATTEMPT, outcome="error",
                                    study_uid=series.study_uid, series_uid=series.series_uid,
                                    destination=dest.name,
                                    reason=f"no return route for calling AE {series.calling_ae!r}")
                continue
            routes.append((dest.name, *route))
        for kind, ds, path in written:
            sop_uid = str(ds.SOPInstanceUID)  # type: ignore[attr-defined]
            output = session.scalars(select(OutputInstance).where(
                OutputInstance.sop_uid == sop_uid)).first()
            if output is None:
                output = OutputInstance(sop_uid=sop_uid)
                session.add(output)
            output.sop_class_uid = str(ds.SOPClassUID)  # type: ignore[attr-defined]
            output.series_uid = str(ds.SeriesInstanceUID)  # type: ignore[attr-defined]
            output.kind = kind
            output.source_series_id = series_id
            output.series_version = version
            output.job_id = job_id
            output.path = str(path)
            session.flush()
            for name, ae_title, host, port in routes:
                entry = session.scalars(select(OutboxEntry).where(
                    OutboxEntry.output_id == output.id,
                    OutboxEntry.destination == name)).first()
                if entry is None:
                    session.add(OutboxEntry(output_id=output.id, destination=name,
                                            ae_title=ae_title, host=host, port=port,
                                            state=OutboxState.PENDING))
                    queued += 1
                elif entry.state != OutboxState.SENT:
                    entry.state = OutboxState.PENDING
                    entry.next_attempt_at = utcnow()
                    queued += 1
        findings: dict[str, Any] = {}
        by_lesion = {interval.lesion: interval for interval in intervals}
        if result is not None:
            findings = {"background": round(result.background_mean, 4),
                        "finding": result.finding,
                        "lesions": [{"lesion": lesion.number, "tbr_max": round(lesion.tbr_max, 3),
                                     "tbr_mean": round(lesion.tbr_mean, 3),
                                     "volume_ml": round(lesion.volume_ml, 2),
                                     **_interval_fields(by_lesion.get(lesion.number))}
                                    for lesion in result.lesions]}
        superseded = sorted(set(session.execute(
            select(OutputInstance.series_version, OutputInstance.series_uid).where(
                OutputInstance.source_series_id == series_id,
                OutputInstance.series_version < version)).all()))
        if superseded:  # the earlier sets this version replaces in the viewer
            findings["supersedes"] = [{"version": v, "series_uid": uid}
                                      for v, uid in superseded]
        ctx.audit.record_in(session, AuditKind.OUTPUT_WRITTEN, study_uid=series.study_uid,
                            series_uid=series.series_uid, job=job_id, version=version,
                            outputs=len(written), outbox_entries=queued, **findings)
    return queued
