"""Optional loopback HTTP endpoint: ``/healthz`` and Prometheus metrics at ``/metrics``.

``/healthz``: 200 "ok"; 503 "unhealthy" when a part of the node stopped; 503
"degraded: <reason>" when results cannot be delivered (dead letters, or a result waiting
longer than ``metrics.degraded_pending_age_s``: :func:`dicom_node.ops.status.delivery_problem`).

Metrics are read from the database at scrape time (a custom collector), so they cover
the receive-only processes too, survive restarts and agree with ``dicom-node status``.
Counters are counted from the audit log, which only ever grows (hash-chained, never
pruned), so they never go down, whatever happens to the rows they describe:

- ``dicom_node_instances_received_total`` (``instance.stored`` events)
- ``dicom_node_jobs_total{outcome}``: done, skipped, failed (``job.finish``/``job.fail``)
- ``dicom_node_send_failures_total`` (failed ``send.attempt`` events)
- ``dicom_node_inference_seconds`` (summary over finished jobs' rows, which are never deleted)

Gauges: ``dicom_node_series{state}``, ``dicom_node_queue_depth``, ``dicom_node_jobs_running``,
``dicom_node_outbox_entries{destination,state}``, ``dicom_node_notifications{endpoint,state}``,
``dicom_node_outbox_oldest_pending_age_seconds`` (0 when nothing waits) and
``dicom_node_build_info{version,model,model_version,model_sha256,device}`` (always 1).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import MetricsConfig
from dicom_node.ops.status import (
    delivery_problem,
    notification_messages,
    oldest_pending_age_s,
    outbox_entries,
    queue_depth,
    series_per_state,
)
from storage.audit import AuditKind
from storage.models import AuditEvent, Job, JobState, utcnow

#: How ``job.finish`` events of skipped series look in the audit detail (JSON, sorted keys).
_SKIPPED_DETAIL = '%"result": "skipped"%'


@dataclass(frozen=True)
class BuildInfo:
    """What runs: ``dicom_node_build_info``'s labels."""

    version: str
    model: str
    model_version: str
    model_sha256: str
    device: str


def _count_events(session: Session, kind: AuditKind, *conditions: ColumnElement[bool]) -> int:
    """Audit events of ``kind`` (through its index) that meet ``conditions``."""
    return session.scalar(select(func.count()).select_from(AuditEvent).where(
        AuditEvent.kind == kind, *conditions)) or 0


class NodeCollector:
    """Prometheus collector over the node's database."""

    def __init__(self, sessions: sessionmaker[Session], build: BuildInfo) -> None:
        self._sessions = sessions
        self._build = build

    def collect(self) -> Iterator[Metric]:
        with self._sessions() as session:
            instances = _count_events(session, AuditKind.INSTANCE_STORED)
            skipped = _count_events(session, AuditKind.JOB_FINISH,
                                    AuditEvent.detail.like(_SKIPPED_DETAIL))
            finished = _count_events(session, AuditKind.JOB_FINISH)
            failed = _count_events(session, AuditKind.JOB_FAIL, AuditEvent.series_uid != "")
            failures = _count_events(session, AuditKind.SEND_ATTEMPT, AuditEvent.outcome == "error")
            states = series_per_state(session)
            running = session.scalar(select(func.count()).select_from(Job)
                                     .where(Job.state == JobState.RUNNING)) or 0
            done_count, done_seconds = session.execute(
                select(func.count(), func.sum(Job.seconds)).where(Job.state == JobState.DONE)).one()
            outbox: dict[tuple[str, str], int] = {}
            for destination, state, _attempted, count in outbox_entries(session):
                outbox[destination, state] = outbox.get((destination, state), 0) + count
            pending_age = oldest_pending_age_s(session, utcnow())
            messages: dict[tuple[str, str], int] = {}
            for endpoint, state, _attempted, count in notification_messages(session):
                messages[endpoint, state] = messages.get((endpoint, state), 0) + count
        yield CounterMetricFamily("dicom_node_instances_received", "Instances received and stored",
                                  value=instances)
        series = GaugeMetricFamily("dicom_node_series", "Series per state", labels=["state"])
        for state, count in states.items():
            series.add_metric([state], count)
        yield series
        yield GaugeMetricFamily("dicom_node_queue_depth", "Series ready or queued",
                                value=queue_depth(states))
        job_metric = CounterMetricFamily("dicom_node_jobs", "Finished jobs per outcome",
                                         labels=["outcome"])
        job_metric.add_metric(["done"], finished - skipped)
        job_metric.add_metric(["skipped"], skipped)
        job_metric.add_metric(["failed"], failed)
        yield job_metric
        yield GaugeMetricFamily("dicom_node_jobs_running", "Jobs running now", value=running)
        yield SummaryMetricFamily("dicom_node_inference_seconds", "Seconds per finished job",
                                  count_value=done_count or 0, sum_value=float(done_seconds or 0.0))
        yield CounterMetricFamily("dicom_node_send_failures", "Failed send attempts",
                                  value=failures)
        entries = GaugeMetricFamily("dicom_node_outbox_entries", "Outbox entries",
                                    labels=["destination", "state"])
        for (destination, state), count in outbox.items():
            entries.add_metric([destination, state], count)
        yield entries
        yield GaugeMetricFamily("dicom_node_outbox_oldest_pending_age_seconds",
                                "Seconds the oldest result waiting for delivery has waited "
                                "(0: none waits)", value=pending_age or 0.0)
        notes = GaugeMetricFamily("dicom_node_notifications", "Notification messages",
                                  labels=["endpoint", "state"])
        for (endpoint, state), count in messages.items():
            notes.add_metric([endpoint, state], count)
        yield notes
        build = GaugeMetricFamily("dicom_node_build_info", "The running node's version and model",
                                  labels=["version", "model", "model_version", "model_sha256",
                                          "device"])
        build.add_metric([self._build.version, self._build.model, self._build.model_version,
                          self._build.model_sha256, self._build.device], 1)
        yield build


class MetricsServer:
    """A small threaded HTTP server on loopback."""

    def __init__(self, sessions: sessionmaker[Session], config: MetricsConfig,
                 healthy: Callable[[], bool], build: BuildInfo) -> None:
        registry = CollectorRegistry()
        registry.register(NodeCollector(sessions, build))

        def health() -> str:
            if not healthy():
                return "unhealthy: a part of the node stopped (receiver, scheduler or a "\
                       "receive process)"
            with sessions() as session:
                problem = delivery_problem(session, utcnow(), config.degraded_pending_age_s)
            return f"degraded: {problem}" if problem else "ok"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    verdict = health()
                    body = f"{verdict}\n".encode()
                    self.send_response(200 if verdict == "ok" else 503)
                    content_type = "text/plain; charset=utf-8"
                elif self.path == "/metrics":
                    body = generate_latest(registry)
                    self.send_response(200)
                    content_type = "text/plain; version=0.0.4"
                else:
                    body = b"not found\n"
                    self.send_response(404)
                    content_type = "text/plain"
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # scrapes are not worth a log line

        self._server = ThreadingHTTPServer((config.bind_address, config.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
