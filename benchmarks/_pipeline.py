"""The node's own job (:func:`dicom_node.jobs.run_series`), timed stage by stage.

The benchmark records a source series as the receiver would (series, instances, a
running job) and runs the node's job function on it with a :class:`Timer` as the job's
timing hook (``NodeContext.timing``), so what is timed is exactly what the node runs.
The context is the service's own (:func:`dicom_node.jobs.open_context`), with the TBR
analysis inline (so its stage is the whole ``measure_tbr``) and, unless asked for, no
uncertainty passes (as in earlier benchmark runs). The running node overlaps the
analysis with SC writing and sending (``benchmarks.end_to_end`` measures that).
Outputs are recorded in the outbox as by the node, so ``outbox.sender.Sender`` sends them
exactly as the running node would.
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
                 destinations: list[dict[str, Any]] | None = None,
                 uncertainty_samples: int = 0) -> Any:
    """The node's context (``open_context``, as ``dicom-node serve`` builds it) for a
    benchmark node in ``data_dir``; TBR inline."""
    from benchmarks._common import free_port, node_raw_config
    from dicom_node.config import parse_config
    from dicom_node.jobs import open_context

    raw = node_raw_config(data_dir, free_port(), model={"device": device,
                                                        "batch_size": batch_size},
                          analysis={"uncertainty_samples": uncertainty_samples})
    raw["destinations"] = destinations or []
    return open_context(parse_config(raw, data_dir))


def add_series_and_job(ctx: Any, paths: list[Path]) -> tuple[int, int]:
    """Record ``paths`` as one received series (as the receiver and recorder would) and
    a running job for it; returns (series id, job id)."""
    from pydicom import dcmread

    from storage.models import Instance, Job, JobState, Series, SeriesState

    headers = [dcmread(path, stop_before_pixels=True) for path in paths]
    first = headers[0]
    with ctx.sessions() as session:
        series = Series(series_uid=str(first.SeriesInstanceUID),
                        study_uid=str(first.StudyInstanceUID), calling_ae="STORESCU",
                        peer_address="127.0.0.1", state=SeriesState.RUNNING,
                        instance_count=len(paths))
        session.add(series)
        session.flush()
        session.add_all(Instance(sop_uid=str(ds.SOPInstanceUID),
                                 sop_class_uid=str(ds.SOPClassUID),
                                 transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                                 series_id=series.id, path=str(path),
                                 size_bytes=path.stat().st_size)
                        for ds, path in zip(headers, paths, strict=True))
        job = Job(series_id=series.id, series_version=1, state=JobState.RUNNING,
                  device="bench")
        session.add(job)
        session.commit()
        return series.id, job.id


def run_series_timed(ctx: Any, paths: list[Path], timer: Timer,
                     fine: bool = True) -> int:
    """``jobs.run_series`` on ``paths`` with ``timer`` as its timing hook (``fine``: also
    the steps inside inference and the SC writer); returns the outbox entries queued."""
    import dicom_node.inference.predictor as inference
    import dicom_node.writers.sc as sc_mod
    from dicom_node.jobs import run_series, untimed

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
    series_id, job_id = add_series_and_job(ctx, paths)
    ctx.timing = timer.stage
    try:
        return int(run_series(ctx, series_id, job_id))
    finally:
        ctx.timing = untimed
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
