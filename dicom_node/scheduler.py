"""Scheduler wiring: the periodic jobs and the executors they run on.

- ``sweep`` (every ``sweep_interval_s``): quiet series become ready, ready series
  are triaged into queued or skipped.
- ``inference`` (its own single-thread executor: one worker, jobs in order): the
  queued series, oldest first, one at a time.
- ``send`` (its own single-thread executor): due outbox entries; woken as soon as a job
  queues outputs (:class:`SendLoop`), so a series' SC slices stream out while its TBR
  analysis still runs.
- ``notify`` (its own single-thread executor, only with ``[[notifications]]``): messages
  made from new audit events, then the due ones sent (:mod:`dicom_node.outbox.notifications`).

Each job is a boundary: an exception is logged and written to the audit log, and
the job runs again at its next interval.

Roles (``[node] role``): ``all`` runs every job; a ``worker`` the sweep, inference and
retention (no send, no notify: the senders poll the outbox); a ``sender`` only send and
notify (:func:`build_send_scheduler`, no model).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.outbox.retention import apply_retention
from dicom_node.outbox.sender import Sender
from dicom_node.series.tracking import sweep, take_over_expired, triage
from storage.audit import AuditKind, AuditLog

if TYPE_CHECKING:  # the jobs import torch: a sender (build_send_scheduler) never does
    from dicom_node.jobs import NodeContext

log = logging.getLogger(__name__)


def _guarded(audit: AuditLog, name: str, work: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            work()
        except Exception as exc:  # job boundary
            log.exception("%s job failed", name)
            audit.record(AuditKind.JOB_FAIL, outcome="error", job_name=name,
                         reason=f"{type(exc).__name__}: {exc}")
    return run


def drain_queue(ctx: NodeContext, on_queued: Callable[[], None] | None = None) -> None:
    from dicom_node.jobs import process_next  # only a node with a model gets here

    while not ctx.stopping.is_set() and process_next(ctx, on_queued):
        pass


class SendLoop:
    """The send job, woken whenever a job queues outputs, also while it is sending.

    A wake-up that arrives while a pass runs is not lost (the scheduler would skip a
    second instance of a running job): the pass repeats until no wake-up came during it.
    """

    def __init__(self, send: Callable[[], object], wake_job: Callable[[], None]) -> None:
        self._send = send
        self._wake_job = wake_job
        self._lock = threading.Lock()
        self._running = False
        self._woken = False

    def wake(self) -> None:
        with self._lock:
            self._woken = True
            if self._running:
                return  # the running pass sees the flag and goes round again
        self._wake_job()

    def run(self) -> None:
        with self._lock:
            self._running = True
        try:
            while True:
                with self._lock:
                    self._woken = False
                self._send()
                with self._lock:
                    if not self._woken:
                        self._running = False  # in the same hold as the check: a later
                        return  # wake-up finds the job idle and starts it
        except BaseException:
            with self._lock:
                self._running = False
            raise


def _scheduler() -> BackgroundScheduler:
    return BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(1), "inference": ThreadPoolExecutor(1),
                   "send": ThreadPoolExecutor(1), "notify": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        timezone="UTC",
    )


def _waker(scheduler: BackgroundScheduler) -> Callable[[str], None]:
    def wake(job_id: str) -> None:
        """Run a job now instead of at its next interval (work is waiting for it)."""
        job = scheduler.get_job(job_id)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))
    return wake


def _add_send_jobs(scheduler: BackgroundScheduler, audit: AuditLog, sender: Sender,
                   send_interval_s: float, notify: Callable[[], object] | None) -> SendLoop:
    send_loop = SendLoop(sender.send_due, lambda: _waker(scheduler)("send"))
    # Two instances: a wake-up in the instant after a pass ended but before the scheduler
    # counted it finished queues a second pass on the one send thread instead of being
    # skipped; passes never overlap.
    scheduler.add_job(_guarded(audit, "send", send_loop.run), "interval",
                      seconds=send_interval_s, id="send", executor="send", max_instances=2)
    if notify is not None:  # [[notifications]]: messages made from the audit log, then sent
        scheduler.add_job(_guarded(audit, "notify", notify), "interval",
                          seconds=send_interval_s, id="notify", executor="notify")
    return send_loop


def build_send_scheduler(audit: AuditLog, sender: Sender, send_interval_s: float,
                         heartbeat: Callable[[], None] | None = None,
                         notify: Callable[[], object] | None = None) -> BackgroundScheduler:
    """The ``sender`` role's jobs: send and notify (and the systemd watchdog's beat)."""
    scheduler = _scheduler()
    _add_send_jobs(scheduler, audit, sender, send_interval_s, notify)
    if heartbeat is not None:
        scheduler.add_job(_guarded(audit, "heartbeat", heartbeat), "interval",
                          seconds=send_interval_s, id="heartbeat", executor="default")
    return scheduler


def build_scheduler(ctx: NodeContext, sender: Sender,
                    heartbeat: Callable[[], None] | None = None,
                    notify: Callable[[], object] | None = None,
                    send: bool = True) -> BackgroundScheduler:
    """The ``all`` role's jobs, or with ``send=False`` a ``worker``'s (no send, no
    notify)."""
    scheduler = _scheduler()
    interval = ctx.config.series.sweep_interval_s
    wake = _waker(scheduler)

    def sweep_and_triage() -> None:
        # Other workers' expired jobs are taken over first (their series queued again);
        # this node's own leases are renewed by its heartbeat.
        if take_over_expired(ctx.audit, ctx.node_id):
            wake("inference")
        sweep(ctx.config, ctx.audit)
        if triage(ctx.config, ctx.sessions, ctx.audit, ctx.selections):
            wake("inference")
        if heartbeat is not None:
            heartbeat()

    scheduler.add_job(_guarded(ctx.audit, "sweep", sweep_and_triage), "interval",
                      seconds=interval, id="sweep", executor="default")
    on_queued = (_add_send_jobs(scheduler, ctx.audit, sender, ctx.config.outbox.send_interval_s,
                                notify).wake if send else None)
    scheduler.add_job(_guarded(ctx.audit, "inference", lambda: drain_queue(ctx, on_queued)),
                      "interval", seconds=interval, id="inference", executor="inference")

    def retention() -> None:
        with ctx.audit.transaction() as session:
            apply_retention(session, ctx.audit, ctx.config.retention)

    scheduler.add_job(_guarded(ctx.audit, "retention", retention), "interval",
                      seconds=ctx.config.retention.interval_s, id="retention", executor="default")
    return scheduler
