"""The running node (``dicom-node serve``): start everything in order, stop it cleanly.

Roles (``[node] role``, ``serve --role``): :class:`Node` runs ``all`` (receiver, worker
and sender in one process) or ``worker`` (sweep, triage and jobs: no receiver, no
sending). The ``sender`` role is :mod:`dicom_node.send_service`, the
``receiver`` role and the receive-only process (``dicom-node receive``)
:mod:`dicom_node.ingest.receive_process`: they need none of the model, so they do not
import this module (nor torch, which it imports)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.analysis.process import AnalysisProcess
from dicom_node.config import NodeConfig
from dicom_node.errors import ConfigError
from dicom_node.ingest.orphans import OrphanSweep
from dicom_node.ingest.receiver import Receiver
from dicom_node.jobs import open_context
from dicom_node.ops.build_info import package_version
from dicom_node.ops.heartbeat import (
    HeartbeatWriter,
    JobStages,
    NodeIdentity,
    node_host,
    node_name,
)
from dicom_node.ops.metrics_http import BuildInfo, MetricsServer
from dicom_node.outbox.notifications import collect, deliver_due, start_cursor
from dicom_node.outbox.sender import Sender
from dicom_node.scheduler import (
    STOP_JOBS_WARN_S,
    JobsInFlight,
    build_scheduler,
    stop_scheduler,
)
from dicom_node.series.tracking import recover, renew_leases
from dicom_node.writers.warm_up import warm_up_writers
from storage.audit import AuditKind

log = logging.getLogger(__name__)


class Node:
    """Receiver + scheduler + sender over one database and file store (role ``all``), or
    only the scheduler's sweep, triage and jobs (role ``worker``)."""

    def __init__(self, config: NodeConfig) -> None:
        if config.role not in ("all", "worker"):
            raise ConfigError(f"Node runs the roles 'all' and 'worker', not {config.role!r}")
        self.config = config
        self.receives = config.role == "all"
        self.node_id = node_name(node_host(config.role), config.receiver.port)
        # The model first: a node with missing or bad weights never starts.
        self.ctx = open_context(config, self.node_id)
        assert self.ctx.engine is not None
        self.engine = self.ctx.engine
        self.sessions = self.ctx.sessions
        self.audit = self.ctx.audit
        self.store = self.ctx.store
        self.analysis: AnalysisProcess | None = (
            AnalysisProcess() if config.analysis.separate_process else None)
        if self.analysis is not None:
            self.ctx.analysis = self.analysis
        # the running job's stage, for the heartbeat (dicom-node status)
        self.job_stages = JobStages()
        self.ctx.timing = self.job_stages
        self.receiver = Receiver(config, self.sessions, self.audit, self.store)
        self.orphans = OrphanSweep(config, self.receiver, self.store)
        self.sender = Sender(config, self.sessions, self.audit, self.node_id,
                             self.ctx.stopping)
        self.scheduler: BackgroundScheduler | None = None
        self.jobs_in_flight = JobsInFlight()
        self.metrics: MetricsServer | None = None
        self.heartbeat: HeartbeatWriter | None = None
        self._receive_processes: list[subprocess.Popen[bytes]] = []
        self._stopped = threading.Event()

    def _notifier(self, version: str, model: str) -> Callable[[], object] | None:
        """The notify job: messages from new audit events, then the due ones sent."""
        if not self.config.notifications:
            return None

        def notify() -> None:
            collect(self.config, self.audit, version, model)
            deliver_due(self.config, self.audit, self.sessions, self.node_id)
        return notify

    def start(self, heartbeat: Callable[[], None] | None = None) -> None:
        # highdicom logs a few INFO lines per object it writes: chatter, not operations
        logging.getLogger("highdicom").setLevel(logging.WARNING)
        # A worker leaves the store's temporary and unrecorded files alone: they may be a
        # receiver's, mid-write on the shared store.
        partials, unrecorded = self.orphans.at_start() if self.receives else (0, 0)
        resumed = recover(self.audit, associations=self.receives, owner=self.node_id)
        if self.receives:  # role all: it sends too
            self.sender.release_own_claims()
        if self.analysis is not None:
            self.analysis.start()
        warm_up = self._warm_up()
        if self.config.notifications:  # before anything can happen that they report
            start_cursor(self.audit)
        try:
            if self.receives:
                self.receiver.start()
                self._start_receive_processes()
                self.orphans.start()
        except BaseException:
            self._stop_receive_processes()
            self.ctx.analysis.close()
            raise
        card = self.ctx.predictor.model.card
        version = package_version()
        self.scheduler = build_scheduler(
            self.ctx, self.sender, self.jobs_in_flight, heartbeat,
            self._notifier(version, f"{card.name} {card.version}") if self.receives else None,
            send=self.receives)
        self.scheduler.start()
        if self.config.metrics.enabled:
            self.metrics = MetricsServer(
                self.sessions, self.config.metrics, self.healthy,
                BuildInfo(version=version, model=card.name, model_version=card.version,
                          model_sha256=self.ctx.predictor.model.sha256,
                          device=str(self.ctx.predictor.device)))
            self.metrics.start()
        listening = (f"{self.config.receiver.ae_title}@{self.config.receiver.bind_address}:"
                     f"{self.receiver.port}" + (" (TLS)" if self.config.tls.enabled else "")
                     if self.receives else "")
        self.heartbeat = HeartbeatWriter(
            self.sessions,
            NodeIdentity(host=node_host(self.config.role), port=self.config.receiver.port,
                         pid=os.getpid(), version=version, model=f"{card.name} {card.version}",
                         model_sha256=self.ctx.predictor.model.sha256,
                         device=str(self.ctx.predictor.device), listening=listening),
            self.config.heartbeat_interval_s, self.healthy, lambda: self.job_stages.current,
            self._renew_leases)
        self.heartbeat.start()
        self.audit.record(AuditKind.NODE_START, ae_title=self.config.receiver.ae_title,
                          port=self.receiver.port, role=self.config.role,
                          model=card.name, version=card.version,
                          sha256=self.ctx.predictor.model.sha256,
                          device=str(self.ctx.predictor.device), resumed_series=resumed,
                          removed_partial_files=partials, recorded_unrecorded_files=unrecorded,
                          outcome="warning" if "warm_up_error" in warm_up else "ok",
                          **warm_up)
        log.info("node started: model %s %s on %s (warm-up: %s)", card.name, card.version,
                 self.ctx.predictor.device,
                 ", ".join(f"{k} {v}" for k, v in warm_up.items()))

    def _renew_leases(self) -> None:
        """At each heartbeat: the running job this node holds, and (role all) the outbox
        entries its sender claimed, are held longer."""
        renew_leases(self.sessions, self.node_id, self.config.lease_s)
        if self.receives:
            self.sender.renew_claims()

    def _warm_up(self) -> dict[str, Any]:
        """One blank batch through the model and one SC/SEG/SR built in memory, before the
        first series can arrive (otherwise it would wait for their one-time set-up).

        Only an optimisation: a failure (say CUDA out of memory at the full batch size,
        which a series survives by halving its batch) is logged and audited with the
        node's start, and the node starts anyway."""
        done: dict[str, Any] = {}
        errors: list[str] = []
        steps: list[tuple[str, Callable[[], float]]] = [
            ("model_warm_up_s", self.ctx.predictor.warm_up),
            ("writers_warm_up_s", lambda: warm_up_writers(self.ctx.provenance))]
        for name, step in steps:
            try:
                done[name] = round(step(), 3)
            except Exception as exc:  # start-up boundary: reported, never fatal
                log.warning("warm-up step %s failed (the node starts anyway): %s: %s",
                            name, type(exc).__name__, exc)
                errors.append(f"{name}: {type(exc).__name__}: {exc}"[:500])
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if errors:
            done["warm_up_error"] = "; ".join(errors)
        return done

    def _start_receive_processes(self) -> None:
        """``dicom-node receive`` on each of receiver.extra_ports, from the same config file."""
        ports = self.config.receiver.extra_ports
        if not ports:
            return
        if self.config.source_path is None:
            raise ConfigError("receiver.extra_ports needs the node started from a config file")
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # main only
        for port in ports:
            self._receive_processes.append(subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "receive", "--port", str(port),
                 "--config", str(self.config.source_path)], env=env))
            log.info("started receive-only process on port %d", port)

    def _stop_receive_processes(self) -> None:
        for proc in self._receive_processes:
            proc.terminate()
        for proc in self._receive_processes:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._receive_processes.clear()

    def healthy(self) -> bool:
        """Listening, and the scheduler (sweep, inference, send) is running."""
        return (not self._stopped.is_set()
                and (self.receiver.is_listening or not self.receives)
                and self.scheduler is not None and self.scheduler.running
                and all(proc.poll() is None for proc in self._receive_processes))

    def stop(self) -> None:
        """Stop accepting, let the running job finish, flush, close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.ctx.stopping.set()
        if self.heartbeat is not None:
            self.heartbeat.stopping()
        self.orphans.stop()
        self.receiver.stop()
        self._stop_receive_processes()
        if self.metrics is not None:
            self.metrics.stop()
        if self.scheduler is not None:
            stop_scheduler(self.scheduler, self.jobs_in_flight, STOP_JOBS_WARN_S)
        self.ctx.analysis.close()
        self.audit.record(AuditKind.NODE_STOP)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.engine.dispose()
        log.info("node stopped")
