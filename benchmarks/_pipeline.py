"""The node's own series code path (jobs.run_series), stage by stage, timed.

The same calls as ``jobs.run_series``, one after the other, so each stage's own
cost shows. The node itself overlaps them: the TBR analysis runs in its analysis
process while the job writes SC slices 2..N and the sender streams them to PACS
(``benchmarks.end_to_end`` measures that). Outputs are recorded with
``outbox.enqueue.enqueue_outputs`` so ``outbox.sender.Sender`` can send them exactly as the
running node would.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchmarks._common  # noqa: F401  (puts the repo on sys.path)


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        """Time every call of ``owner.attr`` into stage ``name``; returns an undo."""
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)


def make_context(data_dir: Path, device: str = "cpu", batch_size: int = 16,
                 destinations: list[dict[str, Any]] | None = None) -> Any:
    from benchmarks._common import free_port, node_raw_config
    from dicom_node.config import parse_config
    from dicom_node.inference.model_weights import load_weights
    from dicom_node.inference.predictor import Predictor, pick_device
    from dicom_node.jobs import NodeContext
    from storage.audit import AuditLog
    from storage.database import make_engine, make_session_factory
    from storage.file_store import FileStore

    raw = node_raw_config(data_dir, free_port(), model={"device": device,
                                                        "batch_size": batch_size},
                          destinations=destinations or [])
    config = parse_config(raw, data_dir)
    dev = pick_device(config.model.device)
    model = load_weights(config.model.weights_path, dev)
    engine = make_engine(config.database_url)
    sessions = make_session_factory(engine)
    ctx = NodeContext(config=config, sessions=sessions, audit=AuditLog(sessions),
                      store=FileStore(config.store_dir),
                      predictor=Predictor(model, dev, config.model.batch_size, config.fusion))
    ctx.engine = engine  # type: ignore[attr-defined]
    return ctx


def add_series_and_job(ctx: Any, study_uid: str, series_uid: str) -> tuple[int, int]:
    from storage.models import Job, Series, SeriesState

    with ctx.sessions() as session:
        series = Series(series_uid=series_uid, study_uid=study_uid, calling_ae="STORESCU",
                        peer_address="127.0.0.1", state=SeriesState.RUNNING)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, series_version=1, state="running", device="bench")
        session.add(job)
        session.commit()
        return series.id, job.id


def run_series_timed(ctx: Any, paths: list[Path], timer: Timer,
                     fine: bool = True) -> int:
    """jobs.run_series with timing; returns the number of outbox entries queued."""
    import dicom_node.inference.predictor as inference
    import dicom_node.writers.sc as sc_mod
    from dicom_node.analysis.tbr import measure_tbr
    from dicom_node.outbox.enqueue import enqueue_outputs
    from dicom_node.series.selection import select_series
    from dicom_node.series.volume import load_volume
    from dicom_node.writers.sc import ScSeries, encode, summary_lines
    from dicom_node.writers.seg import make_seg
    from dicom_node.writers.sr import make_sr
    from dicom_node.writers.uids import derive_uid, source_fingerprint
    from storage.file_store import atomic_write

    undo = []
    if fine:
        undo += [timer.wrap(inference, "window_t1c", "  pre: window_t1c"),
                 timer.wrap(inference, "to_network", "  pre/post: to_network (resize)"),
                 timer.wrap(inference, "from_network", "  post: from_network (resize back)"),
                 timer.wrap(inference, "defuse", "  post: defuse (colour -> uptake)"),
                 timer.wrap(sc_mod, "burn_in", "  SC: burn_in (text)")]
        generator = ctx.predictor.model.generator
        original_forward = generator.forward

        def forward(x: Any) -> Any:
            with timer.stage("  model: generator forward"):
                out = original_forward(x)
                if x.is_cuda:
                    import torch
                    torch.cuda.synchronize()
                return out

        generator.forward = forward
        undo.append(lambda: delattr(generator, "forward"))
    try:
        with timer.stage("select_series (headers)"):
            selection = select_series(paths, ctx.config.selection)
        assert selection.accepted, selection.reason
        with timer.stage("load/decode (load_volume)"):
            volume = load_volume(selection.slices)
        study_uid = str(volume.datasets[0].StudyInstanceUID)
        series_id, job_id = add_series_and_job(ctx, study_uid,
                                               str(volume.datasets[0].SeriesInstanceUID))
        with timer.stage("Predictor.predict (pre+model+post)"):
            prediction = ctx.predictor.predict(volume.pixels,
                                               slice_spacing_mm=volume.spacing_mm[0],
                                               slice_positions_mm=volume.positions_mm)
        threads = ctx.config.analysis.thread_count()
        with timer.stage(f"TBR (measure_tbr, {threads} thread(s) as the node)"):
            result = measure_tbr(prediction.uptake, volume.voxel_volume_ml,
                                   ctx.config.analysis.tbr_threshold,
                                   ctx.config.analysis.min_lesion_volume_ml,
                                   ctx.predictor.style.display_threshold,
                                   spacing_mm=volume.spacing_mm, t1c_grey=prediction.grey,
                                   columns_toward_patient_left=volume.slices[0].orientation[0] > 0,
                                   threads=threads)
        provenance = ctx.provenance
        fingerprint = source_fingerprint(s.sop_uid for s in volume.slices)
        sha = provenance.weights_sha256

        def uid(kind: str, index: int = 0) -> Any:
            return derive_uid(fingerprint, sha, 1, kind, index)

        by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}
        written: list[tuple[str, object, Path]] = []
        sc_series = uid("sc-series")
        with timer.stage("fusion: uptake drawn over the T1C (fuse_uint8)"):
            fusion8 = prediction.fusion_uint8()
        summary = summary_lines(result)
        with timer.stage("SC: make_sc_series (template + per-slice copy)"):
            series = ScSeries(fusion8, [by_uid[info.sop_uid] for info in volume.slices],
                                volume.slices, sc_series,
                                [uid("sc", index) for index in range(len(volume.slices))],
                                ctx.config.output.series_number_sc, provenance)
        for index in range(len(series)):
            with timer.stage("SC: make_sc_series (template + per-slice copy)"):
                sc = series.instance(index, summary if index == 0 else ())
            path = ctx.store.output_path(study_uid, str(sc_series), str(sc.SOPInstanceUID))
            with timer.stage("SC: encode (SeriesEncoder)"):
                data = series.encode(sc)
            with timer.stage("SC: atomic_write (fsync)"):
                atomic_write(path, data)
            written.append(("sc", sc, path))
        with timer.stage("SEG: make+encode+write"):
            seg = make_seg(volume.datasets, result, uid("seg-series"), uid("seg"),
                             ctx.config.output.series_number_seg, provenance)
            seg_path = ctx.store.output_path(study_uid, str(seg.SeriesInstanceUID),
                                             str(seg.SOPInstanceUID))
            atomic_write(seg_path, encode(seg))
            written.append(("seg", seg, seg_path))
        with timer.stage("SR: make+encode+write"):
            sr = make_sr(volume.datasets, seg, result, uid("sr-series"), uid("sr"),
                           ctx.config.output.series_number_sr, provenance, supersedes=[])
            sr_path = ctx.store.output_path(study_uid, str(sr.SeriesInstanceUID),
                                            str(sr.SOPInstanceUID))
            atomic_write(sr_path, encode(sr))
            written.append(("sr", sr, sr_path))
        with timer.stage("enqueue_outputs (DB)"):
            return int(enqueue_outputs(ctx.config, ctx.audit, series_id, job_id, 1, written, result))
    finally:
        for fn in reversed(undo):
            fn()


def reset_outbox(ctx: Any) -> int:
    """Every outbox entry back to pending and due now (for repeated send runs)."""
    from sqlalchemy import update

    from storage.models import OutboxEntry, OutboxState, utcnow

    with ctx.sessions() as session:
        result = session.execute(update(OutboxEntry).values(
            state=OutboxState.PENDING, attempts=0, next_attempt_at=utcnow(), sent_at=None))
        session.commit()
        return int(result.rowcount or 0)


def output_paths(ctx: Any) -> list[Path]:
    from sqlalchemy import select

    from storage.models import OutputInstance

    with ctx.sessions() as session:
        return [Path(p) for p in session.scalars(
            select(OutputInstance.path).order_by(OutputInstance.id)).all()]
