"""Running one job: a queued series through inference, analysis and the writers, its
outputs handed to the outbox.

:func:`process_next` takes the oldest queued series (queued -> running), runs
:func:`run_series` and records the outcome with :func:`finish` (running -> done,
skipped or failed). Series state changes go through :mod:`dicom_node.series.tracking`;
outputs are queued for sending by :mod:`dicom_node.outbox.enqueue`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import cast

import numpy as np
import torch
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.uid import UID
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.analysis.process import (
    Analysis,
    AnalysisProcessError,
    InlineAnalysis,
    TbrRequest,
)
from dicom_node.analysis.uncertainty import Calibration, lesion_intervals
from dicom_node.config import NodeConfig
from dicom_node.errors import LeaseLost
from dicom_node.inference.model_weights import load_weights
from dicom_node.inference.predictor import Prediction, Predictor, pick_device
from dicom_node.outbox.enqueue import enqueue_outputs, previous_reports
from dicom_node.series.selection import select_series
from dicom_node.series.tracking import Selections, series_paths, set_state
from dicom_node.series.volume import VolumeError, load_volume
from dicom_node.writers.kos import make_kos
from dicom_node.writers.provenance import Provenance, VersionLabels
from dicom_node.writers.sc import ScSeries, encode, summary_lines
from dicom_node.writers.seg import make_seg
from dicom_node.writers.sr import make_image_sr, make_sr
from dicom_node.writers.uids import derive_uid, source_fingerprint
from storage.audit import AuditKind, AuditLog
from storage.database import make_engine, make_session_factory
from storage.file_store import FileStore, atomic_write
from storage.models import Job, JobState, OutputInstance, Series, SeriesState, utcnow

log = logging.getLogger(__name__)



class SeriesSkipped(Exception):
    """The series is not something this node processes (reason in the message)."""


#: A job's timing hook: ``with ctx.timing("stage name"):`` around each stage of
#: :func:`run_series` (the benchmarks time the node's own job with it).
Timing = Callable[[str], AbstractContextManager[object]]


def untimed(_stage: str) -> AbstractContextManager[object]:
    """The running node's timing hook: nothing."""
    return nullcontext()


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
    engine: Engine | None = None  # what ``sessions`` is bound to (disposed at stop)
    timing: Timing = field(default=untimed)
    #: triage's accepted selections, so a job does not read every header again
    selections: Selections = field(default_factory=Selections)
    #: the node's heartbeat name: the owner of the jobs it claims (their leases)
    node_id: str = ""

    @property
    def provenance(self) -> Provenance:
        card = self.predictor.model.card
        return Provenance(manufacturer=self.config.output.manufacturer, model_name=card.name,
                          model_version=card.version,
                          weights_sha256=self.predictor.model.sha256,
                          institution_name=self.config.output.institution_name)


def open_context(config: NodeConfig, node_id: str = "") -> NodeContext:
    """A NodeContext for ``config`` (the service's and the benchmarks' one way to build
    it): the model is loaded first, so a node with missing or bad weights never starts;
    then the database, the audit log (its events naming ``node_id``) and the file store.
    The TBR analysis is inline until the caller sets ``analysis``."""
    device = pick_device(config.model.device)
    model = load_weights(config.model.weights_path, device)
    engine = make_engine(config.database_url)
    sessions = make_session_factory(engine)
    return NodeContext(config=config, sessions=sessions,
                       audit=AuditLog(sessions, node=node_id),
                       store=FileStore(config.store_dir),
                       predictor=Predictor(model, device, config.model.batch_size,
                                           config.fusion),
                       engine=engine, node_id=node_id)


def process_next(ctx: NodeContext, on_queued: Callable[[], None] | None = None) -> bool:
    """Process the oldest queued series, if any. Returns whether one was processed.
    ``on_queued`` is called whenever outputs were queued for sending."""
    with ctx.audit.transaction() as session:
        # The claim: one queued series, locked (PostgreSQL: rows another worker is claiming
        # are skipped, not waited for; SQLite: the write lock), and a job holding it under
        # this node's lease.
        series = session.scalars(select(Series).where(Series.state == SeriesState.QUEUED)
                                 .order_by(Series.updated_at).limit(1)
                                 .with_for_update(skip_locked=True)).first()
        if series is None:
            return False
        job = Job(series_id=series.id, series_version=series.version, state=JobState.RUNNING,
                  device=str(ctx.predictor.device), owner=ctx.node_id,
                  lease_until=utcnow() + timedelta(seconds=ctx.config.lease_s))
        session.add(job)
        session.flush()
        set_state(ctx.audit, session, series, SeriesState.RUNNING, "inference started", job=job.id)
        ctx.audit.record_in(session, AuditKind.JOB_START, study_uid=series.study_uid,
                            series_uid=series.series_uid, job=job.id, device=job.device)
        series_id, job_id = series.id, job.id
    started = time.monotonic()
    try:
        outputs = run_series(ctx, series_id, job_id, on_queued)
    except LeaseLost as exc:
        finish(ctx, series_id, job_id, SeriesState.FAILED, str(exc), started)
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


def finish(ctx: NodeContext, series_id: int, job_id: int, state: SeriesState, reason: str,
           started: float) -> None:
    seconds = time.monotonic() - started
    with ctx.audit.transaction() as session:
        series = session.get(Series, series_id)
        job = session.get(Job, job_id)
        assert series is not None and job is not None
        if job.state != JobState.RUNNING:
            # Fencing: another node took the job over after its lease expired; what this
            # node did is not committed (the job's id is the lease's version).
            log.warning("job %d was taken over (%s): its result is not recorded", job_id,
                        job.error)
            ctx.audit.record_in(session, AuditKind.JOB_FAIL, outcome="warning",
                                study_uid=series.study_uid, series_uid=series.series_uid,
                                job=job_id, seconds=round(seconds, 3),
                                reason=f"lease lost, result not recorded: {job.error}")
            return
        if job.series_version != series.version:
            # A late instance reopened the series while the job ran (version + 1): its
            # result is not recorded, and the series' state is the new version's.
            job.state = JobState.ABANDONED
            job.finished_at = utcnow()
            job.seconds = seconds
            job.error = (f"superseded: a late instance reopened the series as version "
                         f"{series.version}; the result of version {job.series_version} "
                         "is not recorded")
            ctx.audit.record_in(session, AuditKind.JOB_FAIL, outcome="warning",
                                study_uid=series.study_uid, series_uid=series.series_uid,
                                job=job_id, seconds=round(seconds, 3), reason=job.error)
            return
        job.state = (JobState.DONE if state in (SeriesState.DONE, SeriesState.SKIPPED)
                     else JobState.FAILED)
        job.finished_at = utcnow()
        job.seconds = seconds
        job.error = "" if state == SeriesState.DONE else reason
        if series.state == SeriesState.RUNNING:  # an admin may have discarded it meanwhile
            set_state(ctx.audit, session, series, state, reason, job=job_id)
        kind = AuditKind.JOB_FAIL if state == SeriesState.FAILED else AuditKind.JOB_FINISH
        ctx.audit.record_in(session, kind, outcome="error" if state == SeriesState.FAILED
                            else "ok", study_uid=series.study_uid, series_uid=series.series_uid,
                            job=job_id, seconds=round(seconds, 3), result=state, reason=reason)


def run_series(ctx: NodeContext, series_id: int, job_id: int,
               on_queued: Callable[[], None] | None = None) -> int:
    """Inference, analysis and writing for one series; returns the outputs queued.

    The TBR analysis runs in the analysis process (:mod:`dicom_node.analysis.process`) while this
    thread writes SC slices 2..N and draws the uncertainty passes. Nothing is queued for
    sending until the whole set (SC, SEG, SR, image-anchored SR, and the KOS that lists
    them) is written: a job that fails anywhere sends nothing of its version, and the
    files it wrote are removed.
    """
    with ctx.sessions() as session:
        series = session.get(Series, series_id)
        assert series is not None
        paths = series_paths(session, series)
        version = series.version
        study_uid = series.study_uid
        instance_count = series.instance_count
    timed = ctx.timing
    with timed("select_series (headers)"):
        selection = (ctx.selections.take(series_id, version, instance_count)
                     or select_series(paths, ctx.config.selection))
    if not selection.accepted:
        raise SeriesSkipped(selection.reason)
    with timed("load/decode (load_volume)"):
        volume = load_volume(selection.slices)
    with timed("Predictor.predict (pre+model+post)"):
        prediction = predict_with_retries(ctx, volume.pixels, series_id, job_id,
                                          slice_spacing_mm=volume.spacing_mm[0],
                                          slice_positions_mm=volume.positions_mm)
    with timed("TBR: analysis.submit (inline: the whole measure_tbr)"):
        analysis = ctx.analysis.submit(TbrRequest(
            prediction.uptake, volume.voxel_volume_ml, ctx.config.analysis.tbr_threshold,
            ctx.config.analysis.min_lesion_volume_ml, ctx.predictor.style.display_threshold,
            spacing_mm=volume.spacing_mm, t1c_grey=prediction.grey,
            columns_toward_patient_left=volume.columns_toward_patient_left,
            threads=ctx.config.analysis.thread_count()))
    provenance = ctx.provenance
    fingerprint = source_fingerprint(s.sop_uid for s in volume.slices)
    sha = provenance.weights_sha256
    labels = VersionLabels.of(version, ctx.config.output)

    def uid(kind: str, index: int = 0) -> UID:
        return derive_uid(fingerprint, sha, version, kind, index)

    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}
    with timed("fusion: uptake drawn over the T1C (fuse_uint8)"):
        fusion = prediction.fusion_uint8()
    with timed("SC: make_sc_series (template + per-slice copy)"):
        sc = ScSeries(fusion, [by_uid[info.sop_uid] for info in volume.slices],
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
            with timed("uncertainty passes (sample_uptake)"):
                draws = ctx.predictor.sample_uptake(prediction.input_grey, samples,
                                                    slice_spacing_mm=volume.spacing_mm[0],
                                                    slice_positions_mm=volume.positions_mm)
        limit_s = ctx.config.analysis.timeout_s
        try:
            with timed("TBR: waiting for the analysis result"):
                result = analysis.result(timeout=limit_s)
        except TimeoutError as exc:
            ctx.analysis.abort()
            raise AnalysisProcessError(f"TBR analysis took longer than analysis.timeout_s "
                                       f"({limit_s:g} s) and was stopped") from exc
        calibration = Calibration.from_card(ctx.predictor.model.card.tbr_interval)
        intervals = lesion_intervals(draws, result, calibration) if draws is not None else []
        written.insert(0, write_sc(ctx, study_uid, sc, 0,
                                   summary_lines(result, intervals, calibration.level)))
        with timed("SEG: make+encode+write"):
            seg = make_seg(volume.datasets, result, uid("seg-series"), uid("seg"),
                           labels.series_number_seg, provenance, labels.description_suffix)
            written.append(("seg", seg, write_output(ctx, study_uid, seg, encode(seg))))
        with timed("SR: make+encode+write"):
            sr = make_sr(volume.datasets, seg, result, uid("sr-series"), uid("sr"),
                         labels.series_number_sr, provenance,
                         supersedes=previous_reports(ctx.sessions, series_id, version),
                         intervals=intervals,
                         interval_method=(calibration.method_text(samples) if draws is not None
                                          else ""),
                         description_suffix=labels.description_suffix)
            written.append(("sr", sr, write_output(ctx, study_uid, sr, encode(sr))))
            # The same lesions anchored on their TBRmax slices, for viewers that list
            # only image-region measurements (writers/sr.py); none without a lesion.
            image_sr = make_image_sr(
                volume.datasets, result, uid("sr-image-series"), uid("sr-image"),
                labels.series_number_sr_image, provenance,
                supersedes=previous_reports(ctx.sessions, series_id, version, "sr-image"),
                intervals=intervals,
                interval_method=(calibration.method_text(samples) if draws is not None
                                 else ""),
                description_suffix=labels.description_suffix)
            if image_sr is not None:
                written.append(("sr-image", image_sr,
                                write_output(ctx, study_uid, image_sr, encode(image_sr))))
        with timed("KOS: make+encode+write"):
            # The result set as one object (IHE AIR): every instance written above, the
            # volumetric SR first (the KOS copies patient and study from it).
            members = [sr, *(cast(Dataset, ds) for kind, ds, _ in written if kind != "sr")]
            kos = make_kos(members, uid("kos-series"), uid("kos"), labels.series_number_kos,
                           provenance, labels.description_suffix)
            written.append(("kos", kos, write_output(ctx, study_uid, kos, encode(kos))))
    except BaseException:
        discard_unrecorded(ctx, [path for _, _, path in written])
        raise
    with timed("enqueue_outputs (DB)"):
        count = enqueue_outputs(ctx.config, ctx.audit, series_id, job_id, version, written,
                                result, intervals)
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


def write_output(ctx: NodeContext, study_uid: str, ds: Dataset, data: bytes) -> Path:
    """Write one output instance's bytes to its place in the store (atomically)."""
    path = ctx.store.output_path(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    atomic_write(path, data)
    return path


def write_sc(ctx: NodeContext, study_uid: str, sc: ScSeries, index: int,
             summary: list[str] | None = None,
             sop_uid: UID | None = None) -> tuple[str, object, Path]:
    with ctx.timing("SC: make_sc_series (template + per-slice copy)"):
        ds = sc.instance(index, summary or (), sop_uid)
    with ctx.timing("SC: encode (SeriesEncoder)"):
        data = sc.encode(ds)
    with ctx.timing("SC: atomic_write (fsync)"):
        return "sc", ds, write_output(ctx, study_uid, ds, data)


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
