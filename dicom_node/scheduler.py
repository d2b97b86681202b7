"""Scheduler wiring: the periodic jobs and the executors they run on.

- ``sweep`` (every ``sweep_interval_s``): quiet series become ready, ready series
  are triaged into queued or skipped.
- ``inference`` (its own single-thread executor: one worker, jobs in order): the
  queued series, oldest first, one at a time.
- ``send`` (its own single-thread executor): due outbox entries.

Each job is a boundary: an exception is logged and written to the audit log, and
the job runs again at its next interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.processing import NodeContext, process_next, sweep, triage
from dicom_node.retention import apply_retention
from dicom_node.sender import Sender
from storage.audit import AuditKind

log = logging.getLogger(__name__)


def _guarded(ctx: NodeContext, name: str, work: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            work()
        except Exception as exc:  # job boundary
            log.exception("%s job failed", name)
            ctx.audit.record(AuditKind.JOB_FAIL, outcome="error", job_name=name,
                             reason=f"{type(exc).__name__}: {exc}")
    return run


def drain_queue(ctx: NodeContext, on_processed: Callable[[], None] | None = None) -> None:
    while not ctx.stopping.is_set() and process_next(ctx):
        if on_processed is not None:
            on_processed()


def build_scheduler(ctx: NodeContext, sender: Sender,
                    heartbeat: Callable[[], None] | None = None) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(1), "inference": ThreadPoolExecutor(1),
                   "send": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        timezone="UTC",
    )
    interval = ctx.config.series.sweep_interval_s

    def wake(job_id: str) -> None:
        """Run a job now instead of at its next interval (work is waiting for it)."""
        job = scheduler.get_job(job_id)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def sweep_and_triage() -> None:
        sweep(ctx)
        if triage(ctx):
            wake("inference")
        if heartbeat is not None:
            heartbeat()

    scheduler.add_job(_guarded(ctx, "sweep", sweep_and_triage), "interval", seconds=interval,
                      id="sweep", executor="default")
    scheduler.add_job(_guarded(ctx, "inference", lambda: drain_queue(ctx, lambda: wake("send"))),
                      "interval", seconds=interval, id="inference", executor="inference")
    scheduler.add_job(_guarded(ctx, "send", sender.send_due), "interval",
                      seconds=ctx.config.outbox.send_interval_s, id="send", executor="send")

    def retention() -> None:
        with ctx.audit.transaction() as session:
            apply_retention(session, ctx.audit, ctx.config.retention)

    scheduler.add_job(_guarded(ctx, "retention", retention), "interval",
                      seconds=ctx.config.retention.interval_s, id="retention", executor="default")
    return scheduler
