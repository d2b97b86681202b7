"""What a peer sees on the wire and what the audit says, for every way the node refuses:
A-ASSOCIATE-RJ with its reason (DCMTK echoscu and raw pynetdicom), the called AE title,
SOP classes that do not match their presentation context, the association limit, bytes
that are not DICOM, absurd PDU lengths, truncated instances, and studies a PACS routes
whole (with CT, PET and the node's own results in them)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.net import dimse_status
from dicom_node.service import Node
from storage.models import Association as AssociationRow
from storage.models import AuditEvent, Instance
from tests.conftest import require_tool, wait_for
from tests.dicom_factory import SeriesSpec, write_series


def _events(node: Node, kind: str) -> list[AuditEvent]:
    with node.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind)
                                    .order_by(AuditEvent.id)).all())


def _echoscu(port: int, calling: str = "STORESCU", called: str = "DICOMNODE",
             *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("echoscu"), "-v", "-aet", calling, "-aec", called,
                           *extra, "127.0.0.1", str(port)], capture_output=True, text=True,
                          timeout=120, check=False)


def _associate(port: int, calling: str = "TESTSCU", called: str = "DICOMNODE",
               contexts: list[str] | None = None, max_pdu: int = 16384) -> object:
    ae = AE(ae_title=calling)
    for uid in contexts or [str(Verification)]:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called, max_pdu=max_pdu)


@pytest.fixture
def node(make_config: Callable[..., NodeConfig],
         start_node: Callable[[NodeConfig], Node]) -> Node:
    return start_node(make_config(series={"stable_after_s": 3600.0, "complete_grace_s": 0.0}))


def test_unknown_calling_ae_gets_an_a_associate_rj_on_the_wire(node: Node) -> None:
    result = _echoscu(node.receiver.port, calling="INTRUDER")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in out, out
    assert "Peer aborted" not in out
    assert "Calling AE Title Not Recognized" in out, out
    assoc = _associate(node.receiver.port, calling="INTRUDER")
    assert assoc.is_rejected  # type: ignore[attr-defined]
    rj = assoc.acceptor.primitive  # type: ignore[attr-defined]
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    rejects = _events(node, "association.reject")
    assert len(rejects) == 2 and all("not a known peer" in e.detail for e in rejects)


def test_called_ae_is_checked_and_recorded_as_asked(
        node: Node, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    result = _echoscu(node.receiver.port, called="NOTTHENODE")
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "Association Rejected" in out, out
    assert "Called AE Title Not Recognized" in out, out
    [reject] = _events(node, "association.reject")
    assert "NOTTHENODE" in reject.detail
    with node.sessions() as session:
        rows = session.scalars(select(AssociationRow)).all()
    assert [(r.called_ae, r.state) for r in rows] == [("NOTTHENODE", "rejected")]
    # accept_any_called_ae: accepted, and the row says what was asked for
    lenient = start_node(make_config(receiver={"accept_any_called_ae": True}))
    assert _echoscu(lenient.receiver.port, called="ANYNAME").returncode == 0
    with lenient.sessions() as session:
        rows = session.scalars(select(AssociationRow)).all()
    assert rows[-1].called_ae == "ANYNAME" and rows[-1].state != "rejected"


def _ct_dataset(mr: Path) -> Dataset:
    ds = dcmread(mr)
    ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.Modality = "CT"
    return ds


def test_sop_class_must_match_the_presentation_context(tmp_path: Path, node: Node) -> None:
    [mr] = write_series(tmp_path / "mr", SeriesSpec(n_slices=1), seed=31)
    ct = _ct_dataset(mr)
    assoc = _associate(node.receiver.port, contexts=[str(MRImageStorage), str(Verification)])
    assert assoc.is_established  # type: ignore[attr-defined]
    statuses = []
    # a CT data set over the accepted MR context: the data set does not match
    mr_context = next(cx for cx in assoc.accepted_contexts  # type: ignore[attr-defined]
                      if cx.abstract_syntax == MRImageStorage)
    statuses.append(_send_over(assoc, ct, mr_context, affected=MRImageStorage))
    # an MR C-STORE over the Verification context
    verification = next(cx for cx in assoc.accepted_contexts  # type: ignore[attr-defined]
                        if cx.abstract_syntax == Verification)
    statuses.append(_send_over(assoc, ct, verification, affected=MRImageStorage))
    # an Affected SOP Class that is not the context's
    statuses.append(_send_over(assoc, ct, mr_context, affected=CTImageStorage))
    assoc.release()  # type: ignore[attr-defined]
    assert statuses == [dimse_status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                        dimse_status.SOP_CLASS_NOT_SUPPORTED,
                        dimse_status.SOP_CLASS_NOT_SUPPORTED]
    refused = _events(node, "instance.refused")
    assert len(refused) == 3
    assert all(e.sop_uid == str(ct.SOPInstanceUID) for e in refused)  # named, when readable
    with node.sessions() as session:
        assert session.scalars(select(Instance)).all() == []
    assert list(node.config.store_dir.rglob("*.dcm")) == []


def _send_over(assoc: object, ds: Dataset, context: object, affected: str,
               raw: bytes | None = None) -> int:
    """A C-STORE with a chosen Affected SOP Class over a chosen context (pynetdicom's
    send_c_store picks the context from the data set, so this builds the request);
    ``raw``: these data set bytes instead of the encoded ``ds``."""
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = affected
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = io.BytesIO(raw if raw is not None else encode(ds, False, True))  # type: ignore[arg-type]
    # As pynetdicom's own send_c_store: pause the association's reactor so that it does
    # not take the response off the queue first.
    assoc._reactor_checkpoint.clear()  # type: ignore[attr-defined]
    while not assoc._is_paused:  # type: ignore[attr-defined]
        threading.Event().wait(0.001)
    try:
        dimse = assoc.dimse  # type: ignore[attr-defined]
        dimse.send_msg(request, context.context_id)  # type: ignore[attr-defined]
        _, rsp = dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()  # type: ignore[attr-defined]
    return int(rsp.Status)


def test_max_associations_refusals_are_audited_and_logged(
        make_config: Callable[..., NodeConfig], start_node: Callable[[NodeConfig], Node],
        caplog: pytest.LogCaptureFixture) -> None:
    node = start_node(make_config(receiver={"max_associations": 1}))
    first = _associate(node.receiver.port)
    assert first.is_established  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="dicom_node.ingest.receiver"):
        second = _associate(node.receiver.port)
    assert second.is_rejected  # type: ignore[attr-defined]
    rj = second.acceptor.primitive  # type: ignore[attr-defined]
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    first.release()  # type: ignore[attr-defined]
    assert wait_for(lambda: len(_events(node, "association.reject")) == 1, 60)
    [reject] = _events(node, "association.reject")
    assert "max_associations (1) reached" in json.loads(reject.detail)["reason"]
    assert any("max_associations" in r.getMessage() for r in caplog.records)


def test_bytes_that_are_not_dicom_end_the_connection_with_one_line(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    junk = os.urandom(100_000).replace(b"\x01", b"\x00")  # never an A-ASSOCIATE-RQ
    junk = b"\x5a" + junk[1:]
    with caplog.at_level(logging.DEBUG):
        with socket.create_connection(("127.0.0.1", node.receiver.port), timeout=30) as sock:
            # the node may close the connection while we are still sending
            with contextlib.suppress(OSError):
                sock.sendall(junk)
            sock.settimeout(30)
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
        assert wait_for(lambda: any("not a DICOM" in e.detail or "unrecognised PDU"
                                    in e.detail for e in _events(node, "association.abort")),
                        60)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) <= 2, [r.getMessage() for r in errors]
    aborts = [e for e in _events(node, "association.abort") if "PDU" in e.detail]
    assert len(aborts) == 1


def test_an_absurd_maximum_pdu_length_is_rejected_at_negotiation(node: Node) -> None:
    assoc = _associate(node.receiver.port, max_pdu=1)
    assert assoc.is_rejected  # type: ignore[attr-defined]
    rj = assoc.acceptor.primitive  # type: ignore[attr-defined]
    assert (rj.result, rj.result_source) == (0x01, 0x02)
    assert _events(node, "echo") == []
    [reject] = _events(node, "association.reject")
    assert "maximum PDU length 1" in reject.detail
    # a small but workable PDU length is served, fragments and all
    small = _associate(node.receiver.port, max_pdu=1024)
    assert small.is_established  # type: ignore[attr-defined]
    assert small.send_c_echo().Status == 0  # type: ignore[attr-defined]
    small.release()  # type: ignore[attr-defined]


def test_a_truncated_instance_is_refused_and_named(tmp_path: Path, node: Node) -> None:
    """The data set's bytes as a broken sender puts them on the wire: Pixel Data declares
    more bytes than follow (DCMTK's storescu will not send such a file)."""
    from pynetdicom.dsutils import encode

    [mr] = write_series(tmp_path / "mr", SeriesSpec(n_slices=1), seed=32)
    ds = dcmread(mr)
    whole = encode(ds, False, True)
    assert whole is not None
    assoc = _associate(node.receiver.port, contexts=[str(MRImageStorage)])
    assert assoc.is_established  # type: ignore[attr-defined]
    [context] = assoc.accepted_contexts  # type: ignore[attr-defined]
    status = _send_over(assoc, ds, context, MRImageStorage, raw=whole[: len(whole) - 4000])
    assoc.release()  # type: ignore[attr-defined]
    assert status == dimse_status.CANNOT_UNDERSTAND
    [refused] = _events(node, "instance.refused")
    assert "truncated" in refused.detail and "(7FE0,0010)" in refused.detail, refused.detail
    assert refused.sop_uid == str(ds.SOPInstanceUID)
    assert refused.series_uid == str(ds.SeriesInstanceUID)
    with node.sessions() as session:
        assert session.scalars(select(Instance)).all() == []
    assert list(node.config.store_dir.rglob("*.dcm")) == []


def test_a_study_routed_whole_is_accepted_and_only_the_t1c_processed(
        tmp_path: Path, node: Node) -> None:
    """Every storage SOP class a study may hold has a context; a non-MR instance is stored
    and never processed."""
    [mr] = write_series(tmp_path / "mr", SeriesSpec(n_slices=1), seed=33)
    ct = _ct_dataset(mr)
    ct.SeriesInstanceUID = ct.SeriesInstanceUID[:60] + ".9"
    ct.SOPInstanceUID = ct.SOPInstanceUID[:60] + ".9"
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    ct_path = tmp_path / "ct.dcm"
    ct.save_as(ct_path, enforce_file_format=True)
    contexts = [build_context(uid) for uid in (
        CTImageStorage, "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.66.4",
        "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7")]
    ae = AE(ae_title="TESTSCU")
    for cx in contexts:
        ae.add_requested_context(cx.abstract_syntax, ExplicitVRLittleEndian)  # type: ignore[arg-type]
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert {str(cx.abstract_syntax) for cx in assoc.accepted_contexts} == {
        str(cx.abstract_syntax) for cx in contexts}
    assert assoc.send_c_store(dcmread(ct_path)).Status == 0
    assoc.release()
    with node.sessions() as session:
        [instance] = session.scalars(select(Instance)).all()
    assert instance.sop_class_uid == CTImageStorage


def test_refused_contexts_are_audited(node: Node) -> None:
    assoc = _associate(node.receiver.port, contexts=[str(Verification), "1.2.3.4.5.6"])
    assert assoc.is_established  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    [accept] = _events(node, "association.accept")
    refused = json.loads(accept.detail)["refused_contexts"]
    assert [c["abstract_syntax"] for c in refused] == ["1.2.3.4.5.6"]


def test_concurrent_rejections_do_not_block_the_receiver(node: Node) -> None:
    """An RJ waits for the peer to close; other peers are served meanwhile."""
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        _echoscu(node.receiver.port, calling="INTRUDER").returncode)) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert _echoscu(node.receiver.port).returncode == 0
    for thread in threads:
        thread.join(120)
    assert len(results) == 3 and all(code != 0 for code in results)
