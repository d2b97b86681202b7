"""What ``dicom-node status`` reports: series per state, queue depth, the running job,
the outbox per destination, the last error of each stage and the free disk; read from
the database (and the data directory), so it works beside a running node. The counts
shared with ``/metrics`` (:mod:`dicom_node.ops.metrics_http`) come from the query
functions here."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from storage.audit import AuditKind
from storage.models import AuditEvent, Job, JobState, OutboxEntry, OutboxState, Series, SeriesState


def series_per_state(session: Session) -> dict[str, int]:
    """How many series are in each state (states with none are absent)."""
    return dict(session.execute(
        select(Series.state, func.count()).group_by(Series.state)).all())


def queue_depth(series_states: Mapping[str, int]) -> int:
    """Series waiting for a job: ready or queued."""
    return series_states.get(SeriesState.READY, 0) + series_states.get(SeriesState.QUEUED, 0)


def outbox_entries(session: Session) -> list[tuple[str, str, bool, int]]:
    """Outbox entries counted per (destination, state, attempted before)."""
    rows = session.execute(
        select(OutboxEntry.destination, OutboxEntry.state, OutboxEntry.attempts > 0,
               func.count())
        .group_by(OutboxEntry.destination, OutboxEntry.state, OutboxEntry.attempts > 0))
    return [(dest, state, bool(attempted), count) for dest, state, attempted, count in rows]


def node_status(config: NodeConfig, sessions: sessionmaker[Session]) -> dict[str, Any]:
    """The status report as a JSON-ready dict."""
    with sessions() as session:
        states = series_per_state(session)
        outbox: dict[str, dict[str, int]] = {
            d.name: {"pending": 0, "retrying": 0, "dead": 0, "sent": 0}
            for d in config.destinations}
        for dest, state, attempted, count in outbox_entries(session):
            key = "retrying" if state == OutboxState.PENDING and attempted else state
            outbox.setdefault(dest, {"pending": 0, "retrying": 0, "dead": 0, "sent": 0})
            outbox[dest][key] = outbox[dest].get(key, 0) + count
        last_errors: dict[str, str] = {}
        for stage, kinds in (("receive", (AuditKind.INSTANCE_REFUSED, AuditKind.ASSOC_REJECT)),
                             ("process", (AuditKind.JOB_FAIL, AuditKind.JOB_RETRY)),
                             ("send", (AuditKind.SEND_ATTEMPT,))):
            event = session.scalars(select(AuditEvent).where(
                AuditEvent.kind.in_(kinds), AuditEvent.outcome != "ok")
                .order_by(AuditEvent.id.desc()).limit(1)).first()
            last_errors[stage] = (f"{event.at:%Y-%m-%d %H:%M:%S} {event.kind} {event.detail}"[:300]
                                  if event else "")
        running = session.scalars(select(Job).where(Job.state == JobState.RUNNING)).first()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(config.data_dir).free
    report = {
        "listening": f"{config.receiver.ae_title}@{config.receiver.bind_address}:"
                     f"{config.receiver.port}" + (" (TLS)" if config.tls.enabled else ""),
        "model": str(config.model.weights_path),
        "device": config.model.device,
        "series": states,
        "queue_depth": queue_depth(states),
        "running_job": running.id if running else None,
        "outbox": outbox,
        "last_error": last_errors,
        "disk_free_mb": round(free / 1024 / 1024),
        "disk_low": free < config.receiver.min_free_disk_mb * 1024 * 1024,
    }
    return report
