"""The ``sender`` role (``dicom-node serve --role sender``): the outbox drained and the
notifications sent, over the shared database and store.

Only what sending needs: no receiver, no model, no torch (a test holds it to that), so a
sender starts in a fraction of the time and memory of a worker
(:mod:`dicom_node.service`)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import NodeConfig
from dicom_node.ops.build_info import package_version
from dicom_node.ops.heartbeat import HeartbeatWriter, NodeIdentity, node_host, node_name
from dicom_node.outbox.notifications import collect, deliver_due, start_cursor
from dicom_node.outbox.sender import Sender
from dicom_node.scheduler import (
    STOP_JOBS_WARN_S,
    JobsInFlight,
    build_send_scheduler,
    stop_scheduler,
)
from storage.audit import AuditKind, AuditLog
from storage.database import make_engine, make_session_factory

log = logging.getLogger(__name__)


class SendOnlyNode:
    """The ``sender`` role: the outbox drained and notifications sent, over the shared
    database and store; no receiver, no model."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.engine = make_engine(config.database_url)
        self.sessions = make_session_factory(self.engine)
        self.node_id = node_name(node_host("sender"), config.receiver.port)
        self.audit = AuditLog(self.sessions, node=self.node_id)
        self.stopping = threading.Event()
        self.sender = Sender(config, self.sessions, self.audit, self.node_id, self.stopping)
        self.scheduler: BackgroundScheduler | None = None
        self.jobs_in_flight = JobsInFlight()
        self.heartbeat: HeartbeatWriter | None = None

    def healthy(self) -> bool:
        return self.scheduler is not None and self.scheduler.running

    def start(self, heartbeat: Callable[[], None] | None = None) -> None:
        version = package_version()
        self.sender.release_own_claims()
        notify: Callable[[], object] | None = None
        if self.config.notifications:
            start_cursor(self.audit)

            def notify() -> None:
                collect(self.config, self.audit, version, "")
                deliver_due(self.config, self.audit, self.sessions, self.node_id)
        self.scheduler = build_send_scheduler(self.audit, self.sender,
                                              self.config.outbox.send_interval_s,
                                              self.jobs_in_flight, heartbeat,
                                              notify)
        self.scheduler.start()
        self.heartbeat = HeartbeatWriter(
            self.sessions,
            NodeIdentity(host=node_host("sender"), port=self.config.receiver.port,
                         pid=os.getpid(), version=version, model="", model_sha256="",
                         device="", listening=""),
            self.config.heartbeat_interval_s, self.healthy, lambda: "",
            self.sender.renew_claims)
        self.heartbeat.start()
        self.audit.record(AuditKind.NODE_START, role="sender")
        log.info("sender started")

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stopping()
        self.stopping.set()
        if self.scheduler is not None:
            stop_scheduler(self.scheduler, self.jobs_in_flight, STOP_JOBS_WARN_S)
        self.audit.record(AuditKind.NODE_STOP, role="sender")
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.engine.dispose()
        log.info("sender stopped")
