"""What ``dicom-node status`` reports, read from the database (and this host), so it works
beside a running node and answers without loading the model:

- whether the node runs: its heartbeat row (:mod:`dicom_node.ops.heartbeat`), its process
  and its listening socket when it runs on this host; with the version, the device it
  actually uses, its uptime and the running job's series and stage;
- series per state and the queue depth, the outbox per destination and the age of the
  oldest result still waiting, whether results can be delivered (:func:`delivery_problem`,
  also behind ``/healthz``), the last error of each stage that has not succeeded since,
  and the free disk.

The counts shared with ``/metrics`` (:mod:`dicom_node.ops.metrics_http`) come from the
query functions here. :func:`format_status` draws the report as tables for people.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, literal_column, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.ops.heartbeat import node_name, stale_after_s
from storage.audit import AuditKind
from storage.models import (
    AuditEvent,
    Job,
    JobState,
    NodeHeartbeat,
    NodeState,
    Notification,
    NotificationState,
    OutboxEntry,
    OutboxState,
    Series,
    SeriesState,
    as_utc,
    utcnow,
)

#: ``dicom-node status`` exit codes (as LSB init scripts' ``status``): running; running
#: but unhealthy (a part stopped, or the port is not listening); not running.
EXIT_RUNNING = 0
EXIT_UNHEALTHY = 1
EXIT_NOT_RUNNING = 3

#: Per stage: the audit kinds that are its errors (outcome other than ok) and those that
#: are its successes (outcome ok). An error is reported only while no success followed it.
STAGE_EVENTS: dict[str, tuple[tuple[AuditKind, ...], tuple[AuditKind, ...]]] = {
    "receive": ((AuditKind.INSTANCE_REFUSED, AuditKind.ASSOC_REJECT), (AuditKind.INSTANCE_STORED,)),
    "process": ((AuditKind.JOB_FAIL, AuditKind.JOB_RETRY), (AuditKind.JOB_FINISH,)),
    "send": ((AuditKind.SEND_ATTEMPT,), (AuditKind.SEND_ATTEMPT,)),
}

_TCP_LISTEN = "0A"


def series_per_state(session: Session) -> dict[str, int]:
    """How many series are in each state (states with none are absent)."""
    return dict(session.execute(
        select(Series.state, func.count()).group_by(Series.state)).all())


def queue_depth(series_states: Mapping[str, int]) -> int:
    """Series waiting for a job: ready or queued."""
    return series_states.get(SeriesState.READY, 0) + series_states.get(SeriesState.QUEUED, 0)


def notification_messages(session: Session) -> list[tuple[str, str, bool, int]]:
    """Notification messages counted per (endpoint, state, attempted before)."""
    # A literal 0, not a bound parameter: PostgreSQL accepts the grouped expression in the
    # select list only if both are the same text (two parameters are two expressions).
    attempted = Notification.attempts > literal_column("0")
    rows = session.execute(
        select(Notification.endpoint, Notification.state, attempted, func.count())
        .group_by(Notification.endpoint, Notification.state, attempted))
    return [(name, state, bool(attempted), count) for name, state, attempted, count in rows]


def outbox_entries(session: Session) -> list[tuple[str, str, bool, int]]:
    """Outbox entries counted per (destination, state, attempted before)."""
    attempted = OutboxEntry.attempts > literal_column("0")  # as notification_messages
    rows = session.execute(
        select(OutboxEntry.destination, OutboxEntry.state, attempted, func.count())
        .group_by(OutboxEntry.destination, OutboxEntry.state, attempted))
    return [(dest, state, bool(attempted), count) for dest, state, attempted, count in rows]


def oldest_pending_age_s(session: Session, now: datetime) -> float | None:
    """Seconds the oldest result still waiting for delivery has waited (since it was queued,
    or re-queued by ``dicom-node outbox retry``); None when nothing waits."""
    oldest = session.scalar(select(func.min(OutboxEntry.created_at))
                            .where(OutboxEntry.state == OutboxState.PENDING))
    return None if oldest is None else max(0.0, (now - as_utc(oldest)).total_seconds())


def delivery_problem(session: Session, now: datetime, max_pending_age_s: float) -> str:
    """Why results cannot be delivered ("" when they can): dead letters, or a result that
    has waited longer than ``max_pending_age_s`` (retries that keep failing)."""
    reasons = []
    dead = session.scalar(select(func.count()).select_from(OutboxEntry)
                          .where(OutboxEntry.state == OutboxState.DEAD)) or 0
    if dead:
        reasons.append(f"{dead} dead letter(s): 'dicom-node outbox --state dead' says why, "
                       "'dicom-node outbox retry' sends them again")
    age = oldest_pending_age_s(session, now)
    if age is not None and age > max_pending_age_s:
        reasons.append(f"a result has waited {age:.0f} s for delivery (over "
                       f"metrics.degraded_pending_age_s = {max_pending_age_s:g} s)")
    return "; ".join(reasons)


def _last_id(session: Session, kind: AuditKind, *, ok: bool, after_id: int = 0) -> int:
    """The id of the newest event of ``kind`` with outcome ok (or not ok) after ``after_id``:
    one kind per query, so the database walks its kind index backwards and stops."""
    outcome = AuditEvent.outcome == "ok" if ok else AuditEvent.outcome != "ok"
    found = session.scalar(select(AuditEvent.id).where(
        AuditEvent.kind == kind, outcome, AuditEvent.id > after_id)
        .order_by(AuditEvent.id.desc()).limit(1))
    return found or 0


def uncleared_errors(session: Session) -> dict[str, str]:
    """Each stage's last error, unless the stage has succeeded since ("" then)."""
    report: dict[str, str] = {}
    for stage, (error_kinds, success_kinds) in STAGE_EVENTS.items():
        last_ok = max(_last_id(session, kind, ok=True) for kind in success_kinds)
        error_id = max(_last_id(session, kind, ok=False, after_id=last_ok) for kind in error_kinds)
        event = session.get(AuditEvent, error_id) if error_id else None
        report[stage] = (f"{as_utc(event.at):%Y-%m-%d %H:%M:%S} {event.kind} {event.detail}"[:300]
                         if event else "")
    return report


def port_listening(port: int, proc_net: Path = Path("/proc/net")) -> bool | None:
    """Whether some process on this host listens on TCP ``port`` (Linux ``/proc/net/tcp``
    and ``tcp6``: nothing is connected or bound); None where that cannot be read."""
    seen_table = False
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc_net / table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen_table = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _TCP_LISTEN and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False if seen_table else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def node_liveness(session: Session, config: NodeConfig, now: datetime,
                  host: str | None = None) -> dict[str, Any]:
    """Whether the node of ``config`` runs, and what it said of itself in its heartbeat."""
    host = host or socket.gethostname()
    row = session.get(NodeHeartbeat, node_name(host, config.receiver.port))
    if row is None:
        return {"state": "not running",
                "reason": "no heartbeat: no 'dicom-node serve' has run on this database from "
                          f"{host} with receiver.port {config.receiver.port}",
                "node": None}
    beat_age = max(0.0, (now - as_utc(row.beat_at)).total_seconds())
    node = {"host": row.host, "pid": row.pid, "version": row.version, "model": row.model,
            "model_sha256": row.model_sha256, "device": row.device, "listening": row.listening,
            "healthy": row.healthy, "started_at": as_utc(row.started_at).isoformat(),
            "uptime_s": round((now - as_utc(row.started_at)).total_seconds(), 1),
            "heartbeat_age_s": round(beat_age, 1), "heartbeat_interval_s": row.interval_s,
            "job_stage": row.job_stage, "port_listening": None}
    if row.state == NodeState.STOPPED:
        return {"state": "not running",
                "reason": f"stopped cleanly at {as_utc(row.beat_at):%Y-%m-%d %H:%M:%S} UTC",
                "node": node}
    limit = stale_after_s(row.interval_s)
    if row.host == host and not _process_alive(row.pid):
        return {"state": "not running",
                "reason": f"process {row.pid} is gone (it ended without a clean stop; last "
                          f"heartbeat {beat_age:.0f} s ago)", "node": node}
    if beat_age > limit:
        return {"state": "not running",
                "reason": f"last heartbeat {beat_age:.0f} s ago (more than {limit:g} s: the "
                          "node ended without a clean stop, or hangs)", "node": node}
    if row.host == host:
        node["port_listening"] = port_listening(config.receiver.port)
    if row.state != NodeState.RUNNING:  # stopping: it has closed its port on purpose
        return {"state": str(row.state), "reason": "finishing the running job, then exits",
                "node": node}
    reason = ""
    if not row.healthy:
        reason = "unhealthy: a part of the node stopped (receiver, scheduler or a receive process)"
    elif node["port_listening"] is False:
        reason = f"not listening on port {config.receiver.port}"
    return {"state": str(row.state), "reason": reason, "node": node}


def _running_job(session: Session, now: datetime) -> dict[str, Any] | None:
    found = session.execute(select(Job, Series).join(Series, Series.id == Job.series_id)
                            .where(Job.state == JobState.RUNNING)
                            .order_by(Job.id.desc()).limit(1)).first()
    if found is None:
        return None
    job, series = found
    return {"id": job.id, "series_uid": series.series_uid,
            "accession_number": series.accession_number, "instances": series.instance_count,
            "version": series.version, "device": job.device,
            "elapsed_s": round((now - as_utc(job.started_at)).total_seconds(), 1)}


def node_status(config: NodeConfig, sessions: sessionmaker[Session],
                now: datetime | None = None) -> dict[str, Any]:
    """The status report as a JSON-ready dict."""
    now = now or utcnow()
    with sessions() as session:
        liveness = node_liveness(session, config, now)
        running = liveness["state"] != "not running"
        states = series_per_state(session)
        outbox: dict[str, dict[str, int]] = {
            d.name: {"pending": 0, "retrying": 0, "dead": 0, "sent": 0}
            for d in config.destinations}
        for dest, state, attempted, count in outbox_entries(session):
            key = "retrying" if state == OutboxState.PENDING and attempted else state
            outbox.setdefault(dest, {"pending": 0, "retrying": 0, "dead": 0, "sent": 0})
            outbox[dest][key] = outbox[dest].get(key, 0) + count
        notifications: dict[str, dict[str, int]] = {
            n.name: {"pending": 0, "retrying": 0, "dead": 0, "sent": 0}
            for n in config.notifications}
        for name, state, attempted, count in notification_messages(session):
            key = "retrying" if state == NotificationState.PENDING and attempted else state
            notifications.setdefault(name, {"pending": 0, "retrying": 0, "dead": 0, "sent": 0})
            notifications[name][key] = notifications[name].get(key, 0) + count
        pending_age = oldest_pending_age_s(session, now)
        delivery = delivery_problem(session, now, config.metrics.degraded_pending_age_s)
        last_errors = uncleared_errors(session)
        job = _running_job(session, now) if running else None
    if job is not None and liveness["node"] is not None:
        job["stage"] = liveness["node"]["job_stage"]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(config.data_dir).free
    node = liveness["node"]
    return {
        "state": liveness["state"],
        "reason": liveness["reason"],
        "node": node,
        "version": node["version"] if node else None,
        "device": node["device"] if running and node else None,
        "configured_device": config.model.device,
        "uptime_s": node["uptime_s"] if running and node else None,
        "listening": f"{config.receiver.ae_title}@{config.receiver.bind_address}:"
                     f"{config.receiver.port}" + (" (TLS)" if config.tls.enabled else ""),
        "model": str(config.model.weights_path),
        "series": states,
        "queue_depth": queue_depth(states),
        "running_job": job,
        "outbox": outbox,
        "outbox_oldest_pending_age_s": None if pending_age is None else round(pending_age, 1),
        "delivery": delivery or "ok",
        "notifications": notifications,
        "last_error": last_errors,
        "disk_free_mb": round(free / 1024 / 1024),
        "disk_low": free < config.receiver.min_free_disk_mb * 1024 * 1024,
    }


def status_exit_code(report: Mapping[str, Any]) -> int:
    """:data:`EXIT_RUNNING`, :data:`EXIT_UNHEALTHY` or :data:`EXIT_NOT_RUNNING`."""
    if report["state"] == "not running":
        return EXIT_NOT_RUNNING
    return EXIT_UNHEALTHY if report["reason"].startswith(("unhealthy", "not listening")) \
        else EXIT_RUNNING


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> list[str]:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]


def format_status(report: Mapping[str, Any]) -> str:
    """The report for people: a headline, then tables."""
    node = report["node"]
    lines = []
    if report["state"] == "not running":
        lines.append(f"dicom-node: NOT RUNNING: {report['reason']}")
    else:
        headline = f"dicom-node: {report['state']}"
        if report["reason"]:
            headline += f" ({report['reason']})"
        lines.append(headline)
    if node is not None:
        rows: list[tuple[str, object]] = [("version", node["version"]),
                                          ("model", f"{node['model']} (sha256 "
                                                    f"{node['model_sha256'][:12]}...)")]
        if report["state"] != "not running":
            listening = node["listening"]
            if node["port_listening"] is not None:
                listening += " (port open)" if node["port_listening"] else " (PORT NOT OPEN)"
            rows += [("device", node["device"]), ("uptime", _duration(node["uptime_s"])),
                     ("process", f"pid {node['pid']} on {node['host']}"),
                     ("heartbeat", f"{node['heartbeat_age_s']:.0f} s ago"),
                     ("listening", listening)]
        else:
            rows.append(("last run", f"pid {node['pid']} on {node['host']}, started "
                                     f"{node['started_at'][:19].replace('T', ' ')} UTC"))
        lines += _table(("", ""), rows)[1:]
    job = report["running_job"]
    if job is not None:
        lines.append("running job:")
        lines += _table(("job", "series", "accession", "instances", "stage", "running for"),
                        [(job["id"], "..." + job["series_uid"][-24:], job["accession_number"] or "-",
                          job["instances"], job.get("stage") or "-", _duration(job["elapsed_s"]))])
    states = report["series"]
    order = [s.value for s in SeriesState]
    lines.append(f"series (queue depth {report['queue_depth']}):")
    lines += _table(order, [[states.get(s, 0) for s in order]])
    lines.append("outbox:")
    if report["outbox"]:
        lines += _table(("destination", "pending", "retrying", "dead", "sent"),
                        [(name, c["pending"], c["retrying"], c["dead"], c["sent"])
                         for name, c in report["outbox"].items()])
    else:
        lines.append("  no destinations configured")
    age = report["outbox_oldest_pending_age_s"]
    lines.append("  oldest waiting result: " + ("none" if age is None else _duration(age)))
    lines.append(f"  delivery: {report['delivery']}")
    if report.get("notifications"):
        lines.append("notifications:")
        lines += _table(("endpoint", "pending", "retrying", "dead", "sent"),
                        [(name, c["pending"], c["retrying"], c["dead"], c["sent"])
                         for name, c in report["notifications"].items()])
    errors = [(stage, text) for stage, text in report["last_error"].items() if text]
    lines.append("last errors (a stage that has succeeded since is not listed):")
    lines += _table(("stage", "error"), errors) if errors else ["  none"]
    lines.append(f"disk free: {report['disk_free_mb']} MB" + (" (LOW)" if report["disk_low"] else ""))
    return "\n".join(lines)
