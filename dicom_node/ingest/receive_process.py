"""The receive-only process (``dicom-node receive``): the Storage SCP and its recorder on
another port, over the node's database and file store.

Only what ingest needs: no model, no scheduler, no torch (a test holds it to that), so
each extra process starts in a fraction of a second and a fraction of the memory of the
full node (:mod:`dicom_node.service`).
"""

from __future__ import annotations

from dataclasses import replace

from dicom_node.config import NodeConfig
from dicom_node.ingest.orphans import OrphanSweep
from dicom_node.ingest.receiver import Receiver
from storage.audit import AuditKind, AuditLog
from storage.database import make_engine, make_session_factory
from storage.file_store import FileStore


class ReceiveOnlyNode:
    """Only the Storage SCP and its recorder, on another port, over the node's database
    and file store: a second process for many concurrent senders, so C-STOREs use a
    second core (one Python process runs one core's worth of handlers). The full node
    (``dicom-node serve``) still does everything else."""

    def __init__(self, config: NodeConfig, port: int, role: str = "receive-only",
                 node_id: str = "") -> None:
        """``role``: what its audit events say it is, ``receive-only`` (beside a full node,
        ``dicom-node receive``) or ``receiver`` (``serve --role receiver``); ``node_id``:
        the name its audit events carry (the CLI passes its heartbeat name)."""
        self.role = role
        self.config = replace(config, receiver=replace(config.receiver, port=port))
        self.engine = make_engine(config.database_url)
        self.sessions = make_session_factory(self.engine)
        self.node_id = node_id
        self.audit = AuditLog(self.sessions, node=self.node_id)
        self.store = FileStore(config.store_dir)
        self.receiver = Receiver(self.config, self.sessions, self.audit, self.store)
        self.orphans = OrphanSweep(self.config, self.receiver, self.store)

    def start(self) -> None:
        if self.role == "receiver":  # a node of its own: takes over a dead receiver's files
            self.orphans.at_start()
        self.receiver.start()
        if self.role == "receiver":
            self.orphans.start()
        self.audit.record(AuditKind.NODE_START, role=self.role,
                          ae_title=self.config.receiver.ae_title, port=self.receiver.port)

    def stop(self) -> None:
        self.orphans.stop()
        self.receiver.stop()
        self.audit.record(AuditKind.NODE_STOP, role=self.role)
        self.engine.dispose()
