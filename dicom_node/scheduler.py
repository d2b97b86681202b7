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

Stopping (:func:`stop_scheduler`): APScheduler's ``shutdown(wait=True)`` joins the job
threads while it holds the scheduler's own locks, and a job that wakes another one (a
series done: the send job; the sweep: the inference job) needs those locks: a node
stopped during a job never stopped. The scheduler is shut down without waiting, and the
running jobs (counted by :class:`JobsInFlight`) are waited for outside its locks.

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
from apscheduler.schedulers.base import STATE_STOPPED

from dicom_node.outbox.retention import apply_retention
from dicom_node.outbox.sender import Sender
from dicom_node.series.tracking import sweep, take_over_expired, triage
from storage.audit import AuditKind, AuditLog

if TYPE_CHECKING:  # the jobs import torch: a sender (build_send_scheduler) never does
    from dicom_node.jobs import NodeContext

log = logging.getLogger(__name__)

#: After this long waiting for the running jobs at a stop (a series being processed ends
#: first; the inference and send loops start nothing new once the node is stopping), the
#: log says how many still run: below the units' TimeoutStopSec (120 s).
STOP_JOBS_WARN_S = 90.0


class JobsInFlight:
    """How many of a scheduler's jobs are running, and a wait until none is. Once
    closed, a job that was still waiting for its thread does not start."""

    def __init__(self) -> None:
        self._idle = threading.Condition()
        self._running = 0
        self._closed = False

    def enter(self) -> bool:
        """Count a job in; False (not counted: it must not run) once closed."""
        with self._idle:
            if self._closed:
                return False
            self._running += 1
            return True

    def close(self) -> None:
        with self._idle:
            self._closed = True

    def leave(self) -> None:
        with self._idle:
            self._running -= 1
            if self._running == 0:
                self._idle.notify_all()

    @property
    def running(self) -> int:
        with self._idle:
            return self._running

    def wait_idle(self, timeout_s: float | None) -> bool:
        """True once no job runs; False if one still does after ``timeout_s`` (None:
        however long it takes)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout=timeout_s)


def _guarded(audit: AuditLog, name: str, work: Callable[[], object],
             in_flight: JobsInFlight) -> Callable[[], None]:
    def run() -> None:
        if not in_flight.enter():
            return  # queued behind another job when the stop began: never started
        try:
            work()
        except Exception as exc:  # job boundary
            log.exception("%s job failed", name)
            audit.record(AuditKind.JOB_FAIL, outcome="error", job_name=name,
                         reason=f"{type(exc).__name__}: {exc}")
        finally:
            in_flight.leave()
    return run


def stop_scheduler(scheduler: BackgroundScheduler, in_flight: JobsInFlight,
                   warn_after_s: float) -> bool:
    """No job starts any more (one queued for a thread is dropped); the running ones
    end, which they do at their next step (they see the node stopping). Waits for them
    however long it takes: what the node tears down next (the analysis process, the
    database) they still use, and their threads would hold the process anyway. Past
    ``warn_after_s`` it logs how many still run, before systemd's TimeoutStopSec kills
    the process (a killed job's series is taken over when its lease runs out). Returns
    whether they had ended within ``warn_after_s``."""
    in_flight.close()
    scheduler.shutdown(wait=False)  # takes and releases the scheduler's locks at once
    if in_flight.wait_idle(warn_after_s):
        return True
    log.warning("%d job(s) still running %.0f s after the stop began; waiting for them "
                "(a kill now leaves the series to be taken over when its lease runs out)",
                in_flight.running, warn_after_s)
    in_flight.wait_idle(None)
    return False


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
        if scheduler.state == STATE_STOPPED:
            return  # stopping: nothing starts again
        job = scheduler.get_job(job_id)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))
    return wake


def _add_send_jobs(scheduler: BackgroundScheduler, audit: AuditLog, sender: Sender,
                   send_interval_s: float, notify: Callable[[], object] | None,
                   in_flight: JobsInFlight) -> SendLoop:
    send_loop = SendLoop(sender.send_due, lambda: _waker(scheduler)("send"))
    # Two instances: a wake-up in the instant after a pass ended but before the scheduler
    # counted it finished queues a second pass on the one send thread instead of being
    # skipped; passes never overlap.
    scheduler.add_job(_guarded(audit, "send", send_loop.run, in_flight), "interval",
                      seconds=send_interval_s, id="send", executor="send", max_instances=2)
    if notify is not None:  # [[notifications]]: messages made from the audit log, then sent
        scheduler.add_job(_guarded(audit, "notify", notify, in_flight), "interval",
                          seconds=send_interval_s, id="notify", executor="notify")
    return send_loop


def build_send_scheduler(audit: AuditLog, sender: Sender, send_interval_s: float,
                         in_flight: JobsInFlight,
                         heartbeat: Callable[[], None] | None = None,
                         notify: Callable[[], object] | None = None) -> BackgroundScheduler:
    """The ``sender`` role's jobs: send and notify (and the systemd watchdog's beat);
    ``in_flight`` counts them while they run (for :func:`stop_scheduler`)."""
    scheduler = _scheduler()
    _add_send_jobs(scheduler, audit, sender, send_interval_s, notify, in_flight)
    if heartbeat is not None:
        scheduler.add_job(_guarded(audit, "heartbeat", heartbeat, in_flight), "interval",
                          seconds=send_interval_s, id="heartbeat", executor="default")
    return scheduler


def build_scheduler(ctx: NodeContext, sender: Sender, in_flight: JobsInFlight,
                    heartbeat: Callable[[], None] | None = None,
                    notify: Callable[[], object] | None = None,
                    send: bool = True) -> BackgroundScheduler:
    """The ``all`` role's jobs, or with ``send=False`` a ``worker``'s (no send, no
    notify); ``in_flight`` counts them while they run (for :func:`stop_scheduler`)."""
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

    scheduler.add_job(_guarded(ctx.audit, "sweep", sweep_and_triage, in_flight), "interval",
                      seconds=interval, id="sweep", executor="default")
    on_queued = (_add_send_jobs(scheduler, ctx.audit, sender, ctx.config.outbox.send_interval_s,
                                notify, in_flight).wake if send else None)
    scheduler.add_job(_guarded(ctx.audit, "inference", lambda: drain_queue(ctx, on_queued),
                               in_flight),
                      "interval", seconds=interval, id="inference", executor="inference")

    def retention() -> None:
        with ctx.audit.transaction() as session:
            apply_retention(session, ctx.audit, ctx.config.retention)

    scheduler.add_job(_guarded(ctx.audit, "retention", retention, in_flight), "interval",
                      seconds=ctx.config.retention.interval_s, id="retention", executor="default")
    return scheduler
