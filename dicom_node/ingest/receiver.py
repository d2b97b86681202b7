"""The Storage SCP: accepts MR series from known peers and files them.

The C-STORE handler stays small: it takes the raw encoded bytes as they arrived
(no decode / re-encode), makes them durable in the file store (fsync + rename),
hands the instance to the :class:`InstanceRecorder` (which commits the instance,
its series and the audit event in batches) and returns a named status. Everything
heavy happens later in the scheduler's jobs.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedMRImageStorage,
    MRImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.ingest.instance_header import InstanceHeader, read_instance_header, truncation
from dicom_node.ingest.instance_recorder import InstanceRecorder, ReceivedInstance, unrecorded_files
from dicom_node.net import dimse_status
from dicom_node.net.ae import bound_blocking_io, end_associations, new_ae, set_nodelay
from dicom_node.net.tls import peer_certificate_subject, server_context
from storage.audit import AuditKind, AuditLog
from storage.file_store import FileStore, InvalidUID, atomic_move, atomic_write
from storage.models import Association as AssociationRow
from storage.models import utcnow

log = logging.getLogger(__name__)

#: The SOP classes the node processes (selection picks the axial T1C among them).
ACCEPTED_SOP_CLASSES: tuple[UID, ...] = (MRImageStorage, EnhancedMRImageStorage)
#: Every other storage SOP class is accepted too and stored, never processed: a PACS
#: that auto-routes a whole study (with its CT, PET, reports and the node's own SC, SEG
#: and SR) must not see its job fail for want of a presentation context.
STORED_ONLY_SOP_CLASSES: tuple[UID, ...] = tuple(
    UID(str(cx.abstract_syntax)) for cx in AllStoragePresentationContexts
    if cx.abstract_syntax not in ACCEPTED_SOP_CLASSES)
# Every transfer syntax pydicom decodes with the plugins the project installs
# (pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls); tests check each decoder is there.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
    HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless,
)
# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason/diagnostic
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
SOURCE_SERVICE_PROVIDER_ACSE = 0x02
DIAG_NO_REASON = 0x01
DIAG_CALLING_AE_NOT_RECOGNIZED = 0x03
DIAG_CALLED_AE_NOT_RECOGNIZED = 0x07
#: A peer that can take PDUs no larger than this cannot be answered (pynetdicom cannot
#: fragment below it): its association is rejected at negotiation.
MIN_PEER_MAX_PDU_BYTES = 1024
REJECTION_LOG_EVERY = 10  # log a persistent caller's rejections once per ten
#: At a stop, established associations may end on their own this long; then every
#: connection left is aborted, and its threads given STOP_JOIN_S to end.
STOP_GRACE_S = 10.0
STOP_JOIN_S = 5.0


@dataclass(frozen=True)
class Rejection:
    """Why an association is refused, and the A-ASSOCIATE-RJ that says so."""

    reason: str
    source: int = SOURCE_SERVICE_USER
    diagnostic: int = DIAG_CALLING_AE_NOT_RECOGNIZED


class _UnknownPduLines(logging.Filter):
    """Drops pynetdicom's per-chunk "Unknown PDU type" errors: the receiver closes such a
    connection at the first one and logs and audits it once itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown PDU type received")


def _quiet_unknown_pdu_lines() -> None:
    dul_log = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, _UnknownPduLines) for f in dul_log.filters):
        dul_log.addFilter(_UnknownPduLines())


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_uid: str


def _discard_partial_dataset(assoc: Association) -> None:
    """Delete the temporary file of an instance still being received when the
    association ended (pynetdicom removes it only after a complete C-STORE)."""
    message = getattr(assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    partial.close()
    Path(partial.name).unlink(missing_ok=True)


def _peer(assoc: Association) -> tuple[str, int]:
    return str(assoc.requestor.address), int(assoc.requestor.port)


class Receiver:
    """Owns the pynetdicom AE that listens for C-STORE and C-ECHO."""

    def __init__(self, config: NodeConfig, sessions: sessionmaker[Session], audit: AuditLog,
                 store: FileStore) -> None:
        self.config = config
        self._sessions = sessions
        self._audit = audit
        self._store = store
        self._assoc_ids: dict[int, int] = {}
        self._rejections: dict[tuple[str, str], list[float]] = {}
        self._rejections_lock = threading.Lock()
        self._bad_pdu_seen: set[int] = set()
        self._server: ThreadedAssociationServer | None = None
        self.recorder = InstanceRecorder(audit)
        self._storage_classes = frozenset(str(uid) for uid in (*ACCEPTED_SOP_CLASSES,
                                                                *STORED_ONLY_SOP_CLASSES))
        self.ae = self._make_ae()

    # -- set-up -------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        rc = self.config.receiver
        # Process-wide in pynetdicom: C-STORE data sets are written to a temporary file
        # as they arrive instead of being buffered in memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = new_ae(rc.ae_title, acse_timeout_s=rc.acse_timeout_s,
                    dimse_timeout_s=rc.dimse_timeout_s, network_timeout_s=rc.network_timeout_s)
        ae.maximum_associations = rc.max_associations
        ae.maximum_pdu_size = rc.max_pdu_bytes
        for sop_class in (*ACCEPTED_SOP_CLASSES, *STORED_ONLY_SOP_CLASSES):
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        rc = self.config.receiver
        self._store.root.mkdir(parents=True, exist_ok=True)  # once, not per instance
        _quiet_unknown_pdu_lines()
        self.recorder.start()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected_by_pynetdicom),
            (evt.EVT_FSM_TRANSITION, self._on_fsm_transition),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self._on_echo),
        ]
        ssl_context = server_context(self.config.tls) if self.config.tls.enabled else None
        self._server = self.ae.start_server((rc.bind_address, rc.port), block=False,
                                            evt_handlers=handlers, ssl_context=ssl_context)
        log.info("listening as %s on %s:%d", rc.ae_title, rc.bind_address, self.port)

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.receiver.port
        return int(self._server.server_address[1])

    @property
    def is_listening(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        """Stop accepting associations; let the established ones end for up to
        STOP_GRACE_S, then abort every connection left (an instance not answered is the
        peer's to send again: nothing is acknowledged that is not stored), and record
        what was stored."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        try:
            deadline = time.monotonic() + STOP_GRACE_S
            while (any(a.is_established for a in self.ae.active_associations)
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            left = self.ae.active_associations
            if left:
                # Released or aborted ones, and those whose reading thread has ended (a
                # connection the peer closed), are only winding down: ended without a word.
                cut = [a for a in left if not (a.is_released or a.is_aborted)
                       and a.dul.is_alive()]
                peers = ", ".join(
                    f"{title}@{_peer(a)[0]}" if (title := str(a.requestor.ae_title).strip())
                    else f"{_peer(a)[0]} (no association requested yet)" for a in cut)
                alive = end_associations(left, STOP_JOIN_S)
                if cut or alive:
                    log.warning("stopping: aborted %d association(s) still open%s%s", len(cut),
                                f": {peers}" if peers else "",
                                f" ({alive} did not end)" if alive else "")
        finally:  # what was stored is recorded, whatever happened above
            self.recorder.stop()

    # -- association events ---------------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        set_nodelay(event.assoc)
        bound_blocking_io(event.assoc, self.config.receiver.network_timeout_s)
        address, port = _peer(event.assoc)
        self._audit.record(AuditKind.ASSOC_OPEN, peer=f"{address}:{port}")

    def is_allowed(self, calling_ae: str, address: str) -> tuple[bool, str]:
        """Is this caller on the allow-list? Returns (allowed, reason)."""
        peer = self.config.peer(calling_ae.strip())
        if peer is None:
            return False, f"calling AE {calling_ae.strip()!r} is not a known peer"
        if peer.addresses and address not in peer.addresses:
            return False, f"calling AE {peer.ae_title!r} from unexpected address {address}"
        return True, ""

    def rejection(self, calling_ae: str, called_ae: str, address: str,
                  peer_max_pdu: int) -> Rejection | None:
        """The reason to refuse an association request, or None to negotiate it."""
        allowed, reason = self.is_allowed(calling_ae, address)
        if not allowed:
            return Rejection(reason)
        rc = self.config.receiver
        if not rc.accept_any_called_ae and called_ae.strip() != rc.ae_title:
            return Rejection(f"called AE {called_ae.strip()!r} is not this node "
                             f"({rc.ae_title!r})", diagnostic=DIAG_CALLED_AE_NOT_RECOGNIZED)
        if 0 < peer_max_pdu < MIN_PEER_MAX_PDU_BYTES:
            return Rejection(f"the peer's maximum PDU length {peer_max_pdu} is below "
                             f"{MIN_PEER_MAX_PDU_BYTES} bytes",
                             source=SOURCE_SERVICE_PROVIDER_ACSE, diagnostic=DIAG_NO_REASON)
        return None

    def _count_rejection(self, calling: str, address: str) -> int:
        """Rejections of this caller in the last minute (the per-caller rate)."""
        now = time.monotonic()
        with self._rejections_lock:
            times = [t for t in self._rejections.get((calling, address), []) if now - t < 60.0]
            times.append(now)
            self._rejections[(calling, address)] = times
            return len(times)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive else ""
        called = str(primitive.called_ae_title).strip() if primitive else ""
        peer_max_pdu = int(primitive.maximum_length_received or 0) if primitive else 0
        address, port = _peer(assoc)
        refusal = self.rejection(calling, called, address, peer_max_pdu)
        if refusal is None:
            return
        recent = self._count_rejection(calling, address)
        # Audit first: the record exists before the peer learns of the rejection.
        with self._audit.transaction() as session:
            row = AssociationRow(calling_ae=calling[:16], called_ae=called[:16],
                                 peer_address=address, peer_port=port, state="rejected",
                                 closed_at=utcnow())
            session.add(row)
            session.flush()
            self._audit.record_in(session, AuditKind.ASSOC_REJECT, outcome="error",
                                  peer=f"{calling}@{address}:{port}", reason=refusal.reason,
                                  called_ae=called, association=row.id,
                                  rejections_last_minute=recent)
        if recent == 1 or recent % REJECTION_LOG_EVERY == 0:
            log.warning("rejected association from %s:%d (%d in the last minute): %s",
                        address, port, recent, refusal.reason)
        assoc.acse.send_reject(REJECT_PERMANENT, refusal.source, refusal.diagnostic)
        # As pynetdicom does for its own rejections: wait until the DUL has sent the
        # A-ASSOCIATE-RJ and the peer closed (or the ARTIM timer ran out); returning at
        # once would close the socket under the queued PDU and the peer would only see
        # the connection drop.
        assoc.kill()

    def _on_rejected_by_pynetdicom(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (the ``max_associations`` limit): audited and
        logged like the node's."""
        assoc = event.assoc
        primitive = assoc.acceptor.primitive
        address, port = _peer(assoc)
        calling = str(assoc.requestor.ae_title).strip()
        source = getattr(primitive, "result_source", None)
        diagnostic = getattr(primitive, "diagnostic", None)
        if (source, diagnostic) == (0x03, 0x02):
            reason = (f"max_associations ({self.config.receiver.max_associations}) reached "
                      f"(rejected-transient, local limit exceeded)")
        else:
            reason = f"rejected by the DICOM stack (source {source}, diagnostic {diagnostic})"
        recent = self._count_rejection(calling, address)
        self._audit.record(AuditKind.ASSOC_REJECT, outcome="error",
                           peer=f"{calling}@{address}:{port}", reason=reason,
                           rejections_last_minute=recent)
        if recent == 1 or recent % REJECTION_LOG_EVERY == 0:
            log.warning("rejected association from %s:%d (%d in the last minute): %s",
                        address, port, recent, reason)

    def _on_fsm_transition(self, event: evt.Event) -> None:
        """Bytes that are not a DICOM PDU end the connection at the first one: one audit
        event, one log line (pynetdicom would otherwise read on, six bytes at a time, and
        log each)."""
        if event.fsm_event != "Evt19":
            return
        assoc = event.assoc
        if id(assoc) in self._bad_pdu_seen:
            return
        self._bad_pdu_seen.add(id(assoc))
        address, port = _peer(assoc)
        self._audit.record(AuditKind.ASSOC_ABORT, outcome="error", peer=f"{address}:{port}",
                           reason="invalid or unrecognised PDU: connection closed")
        log.warning("closed the connection from %s:%d: invalid or unrecognised PDU",
                    address, port)
        sock = assoc.dul.socket
        if sock is not None:
            sock.close()

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        address, port = _peer(assoc)
        calling = str(assoc.requestor.ae_title).strip()
        with self._audit.transaction() as session:
            requested = assoc.requestor.primitive
            called = (str(requested.called_ae_title).strip() if requested is not None
                      else str(assoc.acceptor.ae_title).strip())
            row = AssociationRow(calling_ae=calling, called_ae=called[:16],
                                 peer_address=address, peer_port=port, state="accepted")
            session.add(row)
            session.flush()
            self._assoc_ids[id(assoc)] = row.id
            sock = assoc.dul.socket
            refused: dict[str, Any] = {}
            if assoc.rejected_contexts:
                refused["refused_contexts"] = [
                    {"abstract_syntax": str(cx.abstract_syntax), "result": cx.status}
                    for cx in assoc.rejected_contexts]
            self._audit.record_in(session, AuditKind.ASSOC_ACCEPT,
                                  peer=f"{calling}@{address}:{port}", association=row.id,
                                  tls_subject=peer_certificate_subject(
                                      sock.socket if sock is not None else None),
                                  **refused)

    def _on_acse_recv(self, event: evt.Event) -> None:
        # Runs before pynetdicom answers an A-RELEASE request: the sender's release
        # completes only once every instance it sent is committed.
        primitive = event.primitive  # type: ignore[attr-defined]
        released = isinstance(primitive, A_RELEASE) and primitive.result is None
        if released and not self.recorder.flush(self.config.receiver.network_timeout_s):
            log.warning("instances of a released association not yet recorded: %s",
                            self.recorder.last_error or "recorder busy")

    def _on_closed(self, event: evt.Event, how: str) -> None:
        assoc = event.assoc
        _discard_partial_dataset(assoc)
        self._bad_pdu_seen.discard(id(assoc))
        row_id = self._assoc_ids.pop(id(assoc), None)
        address, port = _peer(assoc)
        calling = str(assoc.requestor.ae_title).strip()
        kind = AuditKind.ASSOC_RELEASE if how == "released" else AuditKind.ASSOC_ABORT
        with self._audit.transaction() as session:
            if row_id is not None:
                row = session.get(AssociationRow, row_id)
                if row is not None:
                    row.state = how
                    row.closed_at = utcnow()
            self._audit.record_in(session, kind, outcome="ok" if how == "released" else "warning",
                                  peer=f"{calling}@{address}:{port}", association=row_id)

    def _on_echo(self, event: evt.Event) -> int:
        address, port = _peer(event.assoc)
        self._audit.record(AuditKind.ECHO, peer=f"{event.assoc.requestor.ae_title}@{address}:{port}")
        return dimse_status.SUCCESS

    # -- C-STORE ----------------------------------------------------------------------------
    def handle_store(self, event: evt.Event) -> int:
        """File one instance; return a named DIMSE status."""
        assoc = event.assoc
        address, port = _peer(assoc)
        peer = f"{str(assoc.requestor.ae_title).strip()}@{address}:{port}"
        sent_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")

        def refuse(status: int, reason: str, header: InstanceHeader | None = None) -> int:
            self._audit.record(
                AuditKind.INSTANCE_REFUSED, outcome="error", peer=peer,
                study_uid=header.study_uid if header else "",
                series_uid=header.series_uid if header else "",
                sop_uid=header.sop_uid if header else sent_uid[:64],
                reason=reason[:500], status=dimse_status.describe(status))
            return status

        context_class = str(event.context.abstract_syntax)
        sent_class = str(getattr(event.request, "AffectedSOPClassUID", "") or "")
        if context_class not in self._storage_classes:
            return refuse(dimse_status.SOP_CLASS_NOT_SUPPORTED,
                          f"C-STORE over the {UID(context_class).name} presentation context")
        if sent_class != context_class:
            return refuse(dimse_status.SOP_CLASS_NOT_SUPPORTED,
                          f"Affected SOP Class {sent_class} is not the presentation "
                          f"context's {context_class}")
        if self._disk_is_low():
            return refuse(dimse_status.OUT_OF_RESOURCES,
                          "free disk space below min_free_disk_mb")
        # Instances arrive streamed to a temporary file (pynetdicom's chunked receive),
        # so a large one never sits in memory; it is renamed into the store.
        streamed: Path | None = getattr(event.request, "_dataset_path", None)
        data = b"" if streamed is not None else event.encoded_dataset()
        size = streamed.stat().st_size if streamed is not None else len(data)
        limit = int(self.config.receiver.max_instance_mb * 1024 * 1024)
        if size > limit:
            return refuse(dimse_status.OUT_OF_RESOURCES,
                          f"instance of {size} bytes exceeds max_instance_mb "
                          f"{self.config.receiver.max_instance_mb:g}")
        try:
            header = read_instance_header(streamed if streamed is not None else BytesIO(data))
            path = self._store.incoming_path(header.study_uid, header.series_uid,
                                             header.sop_uid)
        except (InvalidDicomError, AttributeError, ValueError, InvalidUID, OSError) as exc:
            return refuse(dimse_status.CANNOT_UNDERSTAND,
                          f"cannot read identifying attributes: {exc}")
        if header.sop_class_uid != context_class:
            return refuse(dimse_status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                          f"the data set's SOP Class {header.sop_class_uid or '(none)'} is "
                          f"not the presentation context's {context_class}", header)
        if sent_uid and header.sop_uid != sent_uid:
            return refuse(dimse_status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                          f"the data set's SOP Instance UID is not the Affected SOP "
                          f"Instance UID {sent_uid}", header)
        cut = truncation(streamed if streamed is not None else BytesIO(data))
        if cut is not None:
            return refuse(dimse_status.CANNOT_UNDERSTAND, cut, header)
        if same_bytes(path, streamed, data):
            # A resend of what is already stored (PACS retries and re-routes do this):
            # nothing changes, the series is not reopened.
            if streamed is not None:
                streamed.unlink(missing_ok=True)
            self.recorder.submit(self._received(header, event, str(path), size, peer,
                                                address, identical=True))
            return dimse_status.SUCCESS
        try:
            sync = self.config.receiver.fsync_each_instance
            if streamed is not None:
                atomic_move(streamed, path, sync=sync)
            else:
                atomic_write(path, data, sync=sync)
        except OSError as exc:
            return refuse(dimse_status.OUT_OF_RESOURCES, f"write failed: {exc}", header)
        # The file is in the store: the recorder makes it durable (unless that was done
        # above) and commits its row with the next batch; a start-up scan records it
        # should the node die before that.
        self.recorder.submit(self._received(header, event, str(path), size, peer, address))
        return dimse_status.SUCCESS

    def _disk_is_low(self) -> bool:
        limit = int(self.config.receiver.min_free_disk_mb * 1024 * 1024)
        if limit <= 0:
            return False
        return shutil.disk_usage(self._store.root).free < limit

    def _received(self, header: Any, event: evt.Event, path: str, size: int, peer: str,
                  address: str, identical: bool = False) -> ReceivedInstance:
        return received_instance(header, path, size, str(event.context.transfer_syntax),
                                 calling_ae=str(event.assoc.requestor.ae_title).strip(),
                                 peer_address=address, peer=peer,
                                 association_id=self._assoc_ids.get(id(event.assoc)),
                                 needs_sync=not self.config.receiver.fsync_each_instance
                                 and not identical, identical=identical)

    def record_unrecorded_files(self, older_than_s: float = 0.0) -> int:
        """Record files in ``incoming/`` that have no database row (a node died after
        making them durable and before committing them). ``older_than_s`` 0: every such
        file (one node alone, before :meth:`start`); else only those unchanged for that
        long (a shared store: see ``receiver.orphan_grace_s``)."""
        with self._sessions() as session:
            paths = list(unrecorded_files(session, self._store, older_than_s))
        items = []
        for path in paths:
            try:
                header = read_instance_header(path)
                items.append(received_instance(header, str(path), path.stat().st_size,
                                               header.transfer_syntax_uid,
                                               calling_ae="", peer_address="", peer="recovered",
                                               association_id=None, recovered=True,
                                               needs_sync=True))
            except (InvalidDicomError, AttributeError, ValueError, OSError) as exc:
                log.error("cannot recover %s: %s", path, exc)
        for start in range(0, len(items), 256):
            self.recorder.record(items[start : start + 256])
        if items:
            log.warning("recorded %d received instances that had no database row", len(items))
        return len(items)


def same_bytes(stored: Path, streamed: Path | None, data: bytes) -> bool:
    """Is the instance just received byte for byte the one already stored at ``stored``?
    Compared only when a file is there (a resend), in 1 MiB blocks."""
    try:
        if not stored.is_file():
            return False
        size = streamed.stat().st_size if streamed is not None else len(data)
        if stored.stat().st_size != size:
            return False
        with stored.open("rb") as old:
            if streamed is None:
                return old.read() == data
            with streamed.open("rb") as new:
                while True:
                    a, b = old.read(1 << 20), new.read(1 << 20)
                    if a != b:
                        return False
                    if not a:
                        return True
    except OSError:
        return False


def received_instance(header: InstanceHeader, path: str, size: int, transfer_syntax: str, *,
                      calling_ae: str, peer_address: str, peer: str,
                      association_id: int | None, recovered: bool = False,
                      needs_sync: bool = False, identical: bool = False) -> ReceivedInstance:
    """The recorder's view of one instance, from its header."""
    return ReceivedInstance(
        study_uid=header.study_uid, series_uid=header.series_uid, sop_uid=header.sop_uid,
        sop_class_uid=header.sop_class_uid, transfer_syntax_uid=transfer_syntax, path=path,
        size_bytes=size, patient_id=header.patient_id,
        accession_number=header.accession_number, modality=header.modality,
        description=header.description, instance_number=header.instance_number,
        position_mm=header.position_mm, images_in_acquisition=header.images_in_acquisition,
        calling_ae=calling_ae, peer_address=peer_address, peer=peer,
        association_id=association_id, received_at=utcnow(), recovered=recovered,
        needs_sync=needs_sync, identical=identical)
