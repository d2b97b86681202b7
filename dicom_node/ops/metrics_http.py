"""Optional loopback HTTP endpoint: ``/healthz`` and Prometheus metrics at ``/metrics``.

Metrics are read from the database at scrape time (a custom collector), so they
survive restarts and agree with ``dicom-node status``:

- ``dicom_node_instances_received_total``
- ``dicom_node_series{state}`` and ``dicom_node_queue_depth``
- ``dicom_node_jobs_total{outcome}``, ``dicom_node_inference_seconds`` (sum/count)
- ``dicom_node_send_failures_total``
- ``dicom_node_outbox_entries{destination,state}``
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.ops.status import outbox_entries, queue_depth, series_per_state
from storage.audit import AuditKind
from storage.models import AuditEvent, Instance, Job, JobState


class NodeCollector:
    """Prometheus collector over the node's database."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        with self._sessions() as session:
            instances = session.scalar(select(func.count()).select_from(Instance)) or 0
            states = series_per_state(session)
            jobs = session.execute(select(Job.state, func.count(), func.sum(Job.seconds))
                                   .group_by(Job.state)).all()
            failures = session.scalar(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.kind == AuditKind.SEND_ATTEMPT, AuditEvent.outcome == "error")) or 0
            outbox: dict[tuple[str, str], int] = {}
            for destination, state, _attempted, count in outbox_entries(session):
                outbox[destination, state] = outbox.get((destination, state), 0) + count
        yield CounterMetricFamily("dicom_node_instances_received", "Instances stored",
                                  value=instances)
        series = GaugeMetricFamily("dicom_node_series", "Series per state", labels=["state"])
        for state, count in states.items():
            series.add_metric([state], count)
        yield series
        yield GaugeMetricFamily("dicom_node_queue_depth", "Series ready or queued",
                                value=queue_depth(states))
        job_metric = CounterMetricFamily("dicom_node_jobs", "Jobs per outcome", labels=["outcome"])
        seconds = 0.0
        count_done = 0
        for state, count, total in jobs:
            job_metric.add_metric([state], count)
            if state == JobState.DONE:
                seconds, count_done = float(total or 0.0), count
        yield job_metric
        yield SummaryMetricFamily("dicom_node_inference_seconds", "Seconds per finished job",
                                  count_value=count_done, sum_value=seconds)
        yield CounterMetricFamily("dicom_node_send_failures", "Failed send attempts",
                                  value=failures)
        entries = GaugeMetricFamily("dicom_node_outbox_entries", "Outbox entries",
                                    labels=["destination", "state"])
        for (destination, state), count in outbox.items():
            entries.add_metric([destination, state], count)
        yield entries


class MetricsServer:
    """A small threaded HTTP server on loopback."""

    def __init__(self, sessions: sessionmaker[Session], host: str, port: int,
                 healthy: Callable[[], bool]) -> None:
        registry = CollectorRegistry()
        registry.register(NodeCollector(sessions))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    ok = healthy()
                    body = b"ok\n" if ok else b"unhealthy\n"
                    self.send_response(200 if ok else 503)
                    content_type = "text/plain"
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

        self._server = ThreadingHTTPServer((host, port), Handler)
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
