"""Recording a job's outputs and routing them: one outbox row per output and destination.

A job hands over its whole written set (SC, SEG, SR, the image-anchored SR when there
is a lesion, and the KOS that lists them) at once; nothing of it is queued
before that (a failed job sends nothing). Routing resolves each configured destination,
``return_to_sender`` through the peer the series came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Destination, NodeConfig
from dicom_node.errors import LeaseLost, Superseded
from storage.audit import AuditKind, AuditLog
from storage.models import (
    Job,
    JobState,
    OutboxEntry,
    OutboxState,
    OutputInstance,
    Series,
    SeriesState,
    utcnow,
)

if TYPE_CHECKING:  # types only: the uncertainty module imports torch
    from dicom_node.analysis.tbr import TbrResult
    from dicom_node.analysis.uncertainty import TbrInterval


def resolve_destination(config: NodeConfig, dest: Destination,
                        series: Series) -> tuple[str, str, int] | None:
    """(AE title, host, port) for a destination; None if return-to-sender has no route.
    A DICOMweb destination's row holds its URL as the host (shown by ``outbox``)."""
    if dest.is_dicomweb:
        return "", dest.url[:255], 0
    if not dest.return_to_sender:
        return dest.ae_title, dest.host, dest.port
    peer = config.peer(series.calling_ae)
    if peer is None or peer.return_host is None or peer.return_port is None:
        return None
    return peer.ae_title, peer.return_host, peer.return_port


def previous_reports(sessions: sessionmaker[Session], series_id: int,
                     version: int, kind: str = "sr") -> list[Dataset]:
    """The SR of the given kind ("sr": the volumetric report, "sr-image": the
    image-anchored one) of the newest earlier version of this series that has one, which
    a new report of that kind supersedes."""
    if version <= 1:
        return []
    with sessions() as session:
        path = session.scalars(
            select(OutputInstance.path).where(OutputInstance.source_series_id == series_id,
                                              OutputInstance.kind == kind,
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


def enqueue_outputs(config: NodeConfig, audit: AuditLog, series_id: int, job_id: int,
                    version: int, written: list[tuple[str, object, Path]],
                    result: TbrResult | None, intervals: Sequence[TbrInterval] = ()) -> int:
    """Record outputs and their outbox rows (one per destination) in one transaction;
    the audit event carries the TBR findings (with their intervals) when ``result`` is
    given."""
    queued = 0
    with audit.transaction() as session:
        series = session.get(Series, series_id)
        assert series is not None
        job = session.get(Job, job_id)
        if job is not None and job.state != JobState.RUNNING:
            # Fencing, in the transaction that commits the outputs: the job's lease expired
            # and another node took it over (it records the same UIDs itself).
            raise LeaseLost(f"job {job_id} was taken over: {job.error}")
        if series.version != version:
            # A late instance reopened the series while the job ran: the new version's
            # job makes the result from every instance.
            raise Superseded(f"job {job_id} made version {version}; a late instance "
                             f"reopened the series as version {series.version}")
        routes = []
        # An admin discarded the series while its job ran (dicom-node discard): the
        # outputs are recorded, nothing is queued. Checked in this write transaction,
        # so a discard lands either before it (nothing queued) or after it (it drops
        # what was queued).
        discarded = series.state == SeriesState.DISCARDED
        for dest in () if discarded else config.destinations:
            route = resolve_destination(config, dest, series)
            if route is None:
                audit.record_in(session, AuditKind.SEND_ATTEMPT, outcome="error",
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
        audit.record_in(session, AuditKind.OUTPUT_WRITTEN, study_uid=series.study_uid,
                        series_uid=series.series_uid, job=job_id, version=version,
                        outputs=len(written), outbox_entries=queued,
                        **({"not_sent": "series discarded"} if discarded else {}), **findings)
    return queued
