"""Retention: delete received instances and outputs after an age, never before delivery.

An output file goes once no outbox entry for it waits (pending or dead: sent, or
discarded with its series) and it is older than ``retention.outputs_h``. A received
instance goes once its series is finished (done, skipped, failed or discarded), older
than ``retention.incoming_h``, and none of the series' outputs still waits in the
outbox (pending or dead). The database rows stay (the record of what happened); their
``path`` is cleared.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from dicom_node.config import RetentionConfig
from storage.audit import AuditKind, AuditLog
from storage.models import (
    FINISHED_STATES,
    Instance,
    OutboxEntry,
    OutboxState,
    OutputInstance,
    Series,
    utcnow,
)

log = logging.getLogger(__name__)

#: Outbox states whose output is still to be delivered (a dead letter can be retried).
_UNDELIVERED = (OutboxState.PENDING, OutboxState.DEAD)


def _delete(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def apply_retention(session: Session, audit: AuditLog, cfg: RetentionConfig) -> tuple[int, int]:
    """Delete what is old enough and delivered; returns (instances, outputs) deleted."""
    now = utcnow()
    outputs_deleted = 0
    if cfg.outputs_h > 0:
        undelivered = exists().where(OutboxEntry.output_id == OutputInstance.id,
                                     OutboxEntry.state.in_(_UNDELIVERED))
        old_outputs = session.scalars(select(OutputInstance).where(
            OutputInstance.path != "", OutputInstance.created_at <= now - timedelta(
                hours=cfg.outputs_h), ~undelivered)).all()
        for output in old_outputs:
            _delete(output.path)
            output.path = ""
            outputs_deleted += 1
    instances_deleted = 0
    if cfg.incoming_h > 0:
        waiting = exists().where(OutputInstance.source_series_id == Series.id,
                                 OutboxEntry.output_id == OutputInstance.id,
                                 OutboxEntry.state.in_(_UNDELIVERED))
        old_series = session.scalars(select(Series).where(
            Series.state.in_(FINISHED_STATES),
            Series.last_received_at <= now - timedelta(hours=cfg.incoming_h), ~waiting)).all()
        for series in old_series:
            for instance in session.scalars(select(Instance).where(
                    Instance.series_id == series.id, Instance.path != "")).all():
                _delete(instance.path)
                instance.path = ""
                instances_deleted += 1
    if instances_deleted or outputs_deleted:
        audit.record_in(session, AuditKind.RETENTION, instances=instances_deleted,
                        outputs=outputs_deleted)
        log.info("retention: deleted %d instances, %d outputs", instances_deleted,
                 outputs_deleted)
    else:
        session.commit()
    return instances_deleted, outputs_deleted
