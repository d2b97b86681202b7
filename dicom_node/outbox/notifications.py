"""Notifications: the node tells a webhook or a FHIR server what became of a series.

Made from the audit log, never from the pipeline's own code paths: the notifier reads
the events after its cursor (``notification_cursor``) and turns

- ``series.state`` to done, skipped or failed into a ``done`` / ``skipped`` / ``failed``
  message (done with the findings of the series' newest ``output.written`` event:
  lesion count, TBRs, intervals, equivocal), and
- ``send.attempt`` events that dead-lettered an output into one ``dead_letter`` message
  per output series and destination (with the number of instances),

for every endpoint that asked for that event, and moves the cursor, in one transaction:
a message is made exactly once, and a crash between making and sending it loses
nothing. The first start with notifications begins at the newest event (no flood of old
history); a restart resumes at the cursor. Messages are then POSTed with the outbox's
retry spacing (``[outbox]`` retry_initial_s, retry_max_s, max_age_h) and the endpoint's
``max_attempts``: 2xx is sent, anything else is retried, then dead (and audited as
such). The webhook's body is signed:
``X-DicomNode-Signature: sha256=<hex HMAC-SHA256 of the body with the endpoint's
secret>``; ``X-DicomNode-Event`` and ``X-DicomNode-Delivery`` (the message's stable id)
name it. Patient IDs leave the node only where ``include_patient_ids = true``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
from collections import defaultdict
from datetime import timedelta
from typing import Any

import requests
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from dicom_node.config import NodeConfig, NotificationEndpoint
from dicom_node.outbox.notification_messages import fhir_report, webhook_body
from dicom_node.outbox.stow import tls_verify
from storage.audit import AuditKind, AuditLog
from storage.models import (
    AuditEvent,
    Notification,
    NotificationCursor,
    NotificationState,
    OutboxState,
    OutputInstance,
    Series,
    SeriesState,
    as_utc,
    utcnow,
)

log = logging.getLogger(__name__)

#: Audit events read per pass.
BATCH = 500
_STATE_EVENTS = {SeriesState.DONE: "done", SeriesState.SKIPPED: "skipped",
                 SeriesState.FAILED: "failed"}


def start_cursor(audit: AuditLog) -> None:
    """Where a node with notifications begins: after the newest audit event, unless a
    cursor exists (a restart resumes where it stopped)."""
    with audit.transaction() as session:
        if session.get(NotificationCursor, 1) is None:
            newest = session.scalar(select(func.max(AuditEvent.id))) or 0
            session.add(NotificationCursor(id=1, last_audit_id=newest))


def collect(config: NodeConfig, audit: AuditLog, version: str, model: str) -> int:
    """Make the messages of the audit events after the cursor; returns how many.
    ``version`` is the node's, ``model`` the loaded model's name and version."""
    if not config.notifications:
        return 0
    made = 0
    with audit.transaction() as session:
        cursor = session.get(NotificationCursor, 1)
        if cursor is None:  # not started (start_cursor): begin after the newest event
            newest = session.scalar(select(func.max(AuditEvent.id))) or 0
            session.add(NotificationCursor(id=1, last_audit_id=newest))
            return 0
        events = list(session.scalars(
            select(AuditEvent).where(AuditEvent.id > cursor.last_audit_id,
                                     AuditEvent.kind.in_((AuditKind.SERIES_STATE,
                                                          AuditKind.SEND_ATTEMPT)))
            .order_by(AuditEvent.id).limit(BATCH)))
        if not events:
            return 0
        node = {"ae_title": config.receiver.ae_title, "version": version, "model": model}
        dead: dict[tuple[str, str], list[AuditEvent]] = defaultdict(list)
        for event in events:
            detail = _detail(event)
            if event.kind == AuditKind.SERIES_STATE and detail.get("to") in _STATE_EVENTS:
                name = _STATE_EVENTS[SeriesState(detail["to"])]
                made += _make(session, config, name, event, node, detail)
            elif (event.kind == AuditKind.SEND_ATTEMPT
                  and detail.get("state") == OutboxState.DEAD):
                dead[(event.series_uid, str(detail.get("destination", "")))].append(event)
        for (_series_uid, destination), group in dead.items():
            made += _make(session, config, "dead_letter", group[-1], node,
                          _detail(group[-1]), destination=destination, instances=len(group))
        cursor.last_audit_id = events[-1].id
    return made


def _detail(event: AuditEvent) -> dict[str, Any]:
    try:
        value = json.loads(event.detail) if event.detail else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _make(session: Session, config: NodeConfig, name: str, event: AuditEvent,
          node: dict[str, str], detail: dict[str, Any], destination: str = "",
          instances: int = 0) -> int:
    endpoints = [e for e in config.notifications if name in e.events]
    if not endpoints:
        return 0
    series = _source_series(session, event.series_uid)
    findings = _findings(session, event.series_uid, node["model"]) if name == "done" else None
    made = 0
    for endpoint in endpoints:
        if endpoint.type == "fhir" and findings is None:
            continue
        patient_id = (series.patient_id if series is not None else "") \
            if endpoint.include_patient_ids else None
        event_id = f"{config.receiver.ae_title}/{event.id}"
        study_uid = event.study_uid or (series.study_uid if series is not None else "")
        accession = series.accession_number if series is not None else ""
        source_uid = series.series_uid if series is not None else event.series_uid
        if endpoint.type == "fhir":
            assert findings is not None
            body = fhir_report(event_id=event_id, at=as_utc(event.at), study_uid=study_uid,
                               series_uid=source_uid, accession=accession, findings=findings,
                               model=str(findings.get("model", "")), patient_id=patient_id)
        else:
            body = webhook_body(node=node, event=name, event_id=event_id, at=as_utc(event.at),
                                study_uid=study_uid, series_uid=source_uid, accession=accession,
                                reason=str(detail.get("reason", "")) if name != "done" else "",
                                findings=findings, destination=destination,
                                instances=instances, patient_id=patient_id)
        session.add(Notification(endpoint=endpoint.name, event=name, audit_event_id=event.id,
                                 study_uid=study_uid, series_uid=source_uid,
                                 body=body.decode(), state=NotificationState.PENDING))
        made += 1
    return made


def _source_series(session: Session, series_uid: str) -> Series | None:
    """The received series an event is about: itself, or the one an output came from."""
    series = session.scalars(select(Series).where(Series.series_uid == series_uid)).first()
    if series is not None or not series_uid:
        return series
    source_id = session.scalar(select(OutputInstance.source_series_id).where(
        OutputInstance.series_uid == series_uid).limit(1))
    return session.get(Series, source_id) if source_id is not None else None


def _findings(session: Session, series_uid: str, model: str) -> dict[str, Any]:
    """The findings of the series' newest written result set (its audit event)."""
    written = session.scalars(select(AuditEvent).where(
        AuditEvent.kind == AuditKind.OUTPUT_WRITTEN, AuditEvent.series_uid == series_uid)
        .order_by(AuditEvent.id.desc()).limit(1)).first()
    detail = _detail(written) if written is not None else {}
    lesions = detail.get("lesions", [])
    return {"finding": detail.get("finding", ""), "lesion_count": len(lesions),
            "lesions": lesions, "background": detail.get("background"),
            "version": detail.get("version"), "model": model}


def claim_next(config: NodeConfig, sessions: Any, node_id: str) -> tuple[int, str, str, str] | None:
    """The next due message, claimed for this sender: ``FOR UPDATE SKIP LOCKED``
    (PostgreSQL; SQLite: the write lock) and marked with its name until a lease longer
    than the endpoint's timeout (``outbox.lease_s``); its outcome ends the claim, and a
    dead sender's message is claimed again once its lease has expired."""
    now = utcnow()
    with sessions() as session:
        if session.get_bind().dialect.name == "sqlite":
            session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        row = session.execute(
            select(Notification.id, Notification.endpoint, Notification.event,
                   Notification.body)
            .where(Notification.state == NotificationState.PENDING,
                   Notification.next_attempt_at <= now,
                   or_(Notification.lease_until.is_(None), Notification.lease_until < now))
            .order_by(Notification.id).limit(1).with_for_update(skip_locked=True)).first()
        if row is not None:
            session.execute(update(Notification).where(Notification.id == row[0]).values(
                claimed_by=node_id, lease_until=now + timedelta(seconds=config.outbox.lease_s)))
        session.commit()
    return (row[0], row[1], row[2], row[3]) if row is not None else None


def deliver_due(config: NodeConfig, audit: AuditLog, sessions: Any, node_id: str = "",
                limit: int = 100) -> int:
    """POST the due messages (up to ``limit``), each claimed first (several senders post
    each message once); returns how many were delivered."""
    if not config.notifications:
        return 0
    endpoints = {e.name: e for e in config.notifications}
    delivered = 0
    with requests.Session() as http:
        for _ in range(limit):
            claimed = claim_next(config, sessions, node_id)
            if claimed is None:
                break
            note_id, endpoint_name, event, body = claimed
            endpoint = endpoints.get(endpoint_name)
            problem = ("endpoint no longer configured" if endpoint is None
                       else post(http, endpoint, event, note_id, body.encode()))
            _record(config, audit, note_id, problem,
                    endpoint.max_attempts if endpoint is not None else 1)
            delivered += problem is None
    return delivered


def signature(secret: bytes, body: bytes) -> str:
    """The X-DicomNode-Signature value of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def post(http: requests.Session, endpoint: NotificationEndpoint, event: str, note_id: int,
         body: bytes) -> str | None:
    """One POST; None when the endpoint answered 2xx, else why not."""
    headers = {"X-DicomNode-Event": event, "X-DicomNode-Delivery": str(note_id),
               "User-Agent": "dicom-node"}
    try:
        if endpoint.type == "fhir":
            url = f"{endpoint.url}/DiagnosticReport"
            headers["Content-Type"] = "application/fhir+json"
        else:
            url = endpoint.url
            headers["Content-Type"] = "application/json"
            assert endpoint.secret_file is not None
            secret = endpoint.secret_file.read_bytes().strip()
            headers["X-DicomNode-Signature"] = signature(secret, body)
        if endpoint.bearer_token_file is not None:
            token = endpoint.bearer_token_file.read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        response = http.post(url, data=body, headers=headers, timeout=endpoint.timeout_s,
                             verify=tls_verify(endpoint))
    except (OSError, requests.RequestException) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code} {response.reason}".strip()


def _record(config: NodeConfig, audit: AuditLog, note_id: int, problem: str | None,
            max_attempts: int) -> None:
    cfg = config.outbox
    with audit.transaction() as session:
        note = session.get(Notification, note_id)
        assert note is not None
        note.lease_until = None  # the claim ends with the outcome
        note.attempts += 1
        if problem is None:
            note.state = NotificationState.SENT
            note.sent_at = utcnow()
            note.last_error = ""
        else:
            note.last_error = problem
            age = utcnow() - as_utc(note.created_at)
            if note.attempts >= max_attempts or age > timedelta(hours=cfg.max_age_h):
                note.state = NotificationState.DEAD
                log.warning("notification %d (%s to %s) dead after %d attempts: %s", note.id,
                            note.event, note.endpoint, note.attempts, problem)
            else:
                delay = min(cfg.retry_max_s, cfg.retry_initial_s * 2 ** (note.attempts - 1))
                note.next_attempt_at = utcnow() + timedelta(
                    seconds=delay * random.uniform(0.8, 1.2))
        audit.record_in(session, AuditKind.NOTIFY, outcome="ok" if problem is None else "error",
                        study_uid=note.study_uid, series_uid=note.series_uid,
                        endpoint=note.endpoint, notification_event=note.event,
                        attempt=note.attempts, state=note.state, reason=problem or "")
