"""docs/conformance-statement.md against what the node really negotiates and sends."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)

from dicom_node.config import NodeConfig
from dicom_node.service import Node
from tests.conftest import REPO, free_port, pynetdicom_send, wait_for
from tests.dicom_factory import SeriesSpec, write_series
from tests.test_tls import Pki, pki  # noqa: F401  (the test PKI fixture)

STATEMENT = REPO / "docs" / "conformance-statement.md"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
UID_IN_BACKTICKS = re.compile(r"`([0-9]+(?:\.[0-9]+)+)`")


def _text() -> str:
    return STATEMENT.read_text()


def _block_uids(marker: str) -> list[str]:
    """UIDs listed between <!-- marker --> and the next <!-- end -->."""
    match = re.search(rf"<!-- {marker} -->(.*?)<!-- end -->", _text(), re.S)
    assert match, f"section <!-- {marker} --> missing from {STATEMENT.name}"
    return UID_IN_BACKTICKS.findall(match.group(1))


def _marked_value(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->`([^`]+)`", _text())
    assert match, f"<!-- {marker} --> missing from {STATEMENT.name}"
    return match.group(1)


def test_scp_sop_classes_and_transfer_syntaxes_match_the_running_node(
        make_config: Callable[..., NodeConfig], start_node: Callable[[NodeConfig], Node]) -> None:
    node = start_node(make_config())
    contexts = {str(c.abstract_syntax): [str(ts) for ts in c.transfer_syntax]
                for c in node.receiver.ae.supported_contexts}
    text = _text()
    for sop_class in contexts:
        assert f"`{sop_class}`" in text, f"SCP SOP class {sop_class} not in the statement"
    # Annex E lists the stored-only classes exactly: processed + stored-only = negotiated
    stored_only = _block_uids("scp-stored-only-sop-classes")
    processed = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", str(Verification)}
    assert set(stored_only) | processed == set(contexts)
    assert not set(stored_only) & processed
    storage = {uid: syntaxes for uid, syntaxes in contexts.items() if uid != Verification}
    assert storage, "the node supports no storage SOP class"
    documented = _block_uids("scp-storage-transfer-syntaxes")
    assert len(documented) == len(set(documented)), "a transfer syntax is listed twice"
    for uid, syntaxes in storage.items():
        # the same list, both ways: nothing negotiated that is not documented, and back
        assert set(syntaxes) == set(documented), (
            f"{uid}: negotiated-only {sorted(set(syntaxes) - set(documented))}, "
            f"documented-only {sorted(set(documented) - set(syntaxes))}")
    assert set(contexts[Verification]) == set(_block_uids("scp-verification-transfer-syntaxes"))


def test_node_accepts_what_the_statement_says_it_accepts(
        make_config: Callable[..., NodeConfig], start_node: Callable[[NodeConfig], Node]) -> None:
    """Propose each documented storage transfer syntax on the wire; each one is accepted."""
    node = start_node(make_config())
    documented = _block_uids("scp-storage-transfer-syntaxes")
    ae = AE(ae_title="TESTSCU")
    sop_classes = ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"]
    for sop_class in sop_classes:
        assert f"`{sop_class}`" in _text()
    # one context per (SOP class, transfer syntax): the answer is per syntax
    for sop_class in sop_classes:
        for ts in documented:
            ae.add_requested_context(sop_class, ts)
    ae.add_requested_context(Verification)
    accepted: set[tuple[str, str]] = set()
    # 128 contexts at most per association: split
    contexts = list(ae.requested_contexts)
    for start in range(0, len(contexts), 120):
        scu = AE(ae_title="TESTSCU")
        scu.requested_contexts = contexts[start:start + 120]
        assoc = scu.associate("127.0.0.1", node.receiver.port, ae_title="DICOMNODE")
        assert assoc.is_established
        accepted |= {(str(c.abstract_syntax), str(c.transfer_syntax[0]))
                     for c in assoc.accepted_contexts}
        assoc.release()
    for sop_class in sop_classes:
        assert {ts for sc, ts in accepted if sc == sop_class} == set(documented)


def test_scu_sop_classes_and_identity_match_what_the_node_sends(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """A pynetdicom SCP records what the node proposes and who it says it is."""
    proposed: dict[str, set[str]] = {}
    identities: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def on_requested(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        with lock:
            identities.add((str(requestor.implementation_class_uid),
                            str(requestor.implementation_version_name)))
            for context in requestor.requested_contexts:
                proposed.setdefault(str(context.abstract_syntax), set()).update(
                    str(ts) for ts in context.transfer_syntax)

    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        with lock:
            stored.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    pacs = AE(ae_title="PACS")
    for sop_class in (SecondaryCaptureImageStorage, SegmentationStorage, COMPREHENSIVE_3D_SR,
                      ComprehensiveSRStorage, KOS):
        pacs.add_supported_context(sop_class)
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)])
    try:
        node = start_node(make_config(destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]))
        source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=21)
        assert pynetdicom_send(source, node.receiver.port) == [0] * len(source)
        assert wait_for(lambda: len(stored) >= len(source) + 3, 120)
    finally:
        server.shutdown()  # type: ignore[union-attr]

    text = _text()
    assert set(proposed) == {SecondaryCaptureImageStorage, SegmentationStorage,
                             COMPREHENSIVE_3D_SR, KOS}
    for sop_class in proposed:
        assert f"`{sop_class}`" in text
    documented_ts = set(_block_uids("scp-verification-transfer-syntaxes")) | set(
        _block_uids("scu-transfer-syntaxes"))
    scu_ts = set(_block_uids("scu-transfer-syntaxes"))
    for sop_class, syntaxes in proposed.items():
        assert syntaxes == scu_ts, f"{sop_class}: proposed {sorted(syntaxes)}"
    assert scu_ts <= documented_ts
    assert identities == {(_marked_value("implementation-class-uid"),
                           _marked_value("implementation-version-name"))}


def test_scp_identity_matches_the_statement(
        make_config: Callable[..., NodeConfig], start_node: Callable[[NodeConfig], Node]) -> None:
    node = start_node(make_config())
    scu = AE(ae_title="TESTSCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", node.receiver.port, ae_title="DICOMNODE")
    assert assoc.is_established
    acceptor = assoc.acceptor
    assoc.release()
    assert str(acceptor.implementation_class_uid) == _marked_value("implementation-class-uid")
    assert acceptor.implementation_version_name == _marked_value("implementation-version-name")
    # and it is the node's own, not pynetdicom's default
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

    assert str(acceptor.implementation_class_uid) != str(PYNETDICOM_IMPLEMENTATION_UID)


def test_every_accepted_transfer_syntax_can_be_decoded() -> None:
    """The node only accepts what it can decode: each decoder plugin must be installed."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    from dicom_node.ingest.receiver import ACCEPTED_TRANSFER_SYNTAXES

    missing = [UID(ts).name for ts in ACCEPTED_TRANSFER_SYNTAXES
               if not get_decoder(UID(ts)).is_available]
    assert missing == []


# -- what the statement says about refusals, checked on the wire --------------------------
def _rejection_rows() -> list[tuple[int, int, int]]:
    match = re.search(r"<!-- rejections -->(.*?)<!-- end -->", _text(), re.S)
    assert match, "<!-- rejections --> table missing"
    rows = []
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1][:1].isdigit():
            rows.append((int(cells[1].split()[0]), int(cells[2].split()[0]),
                         int(cells[3].split()[0])))
    return rows


def test_every_documented_rejection_is_what_a_peer_receives(
        make_config: Callable[..., NodeConfig], start_node: Callable[[NodeConfig], Node]) -> None:
    node = start_node(make_config(receiver={"max_associations": 1}))
    port = node.receiver.port
    min_pdu = int(_marked_value("min-peer-pdu"))

    def rj(calling: str = "TESTSCU", called: str = "DICOMNODE",
           max_pdu: int = 16384) -> tuple[int, int, int]:
        scu = AE(ae_title=calling)
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title=called, max_pdu=max_pdu)
        assert assoc.is_rejected, (calling, called, max_pdu)
        answer = assoc.acceptor.primitive
        return (int(answer.result), int(answer.result_source), int(answer.diagnostic))  # type: ignore[union-attr, arg-type]

    seen = [rj(calling="NOBODY"), rj(called="SOMEONEELSE"), rj(max_pdu=min_pdu - 1)]
    holder = AE(ae_title="TESTSCU")
    holder.add_requested_context(Verification)
    first = holder.associate("127.0.0.1", port, ae_title="DICOMNODE", max_pdu=min_pdu)
    assert first.is_established  # the smallest documented PDU length is served
    assert first.send_c_echo().Status == 0
    seen.append(rj())  # one association open, max_associations 1
    first.release()
    assert seen == _rejection_rows()
    from sqlalchemy import select

    from storage.models import AuditEvent

    assert wait_for(lambda: _count(node, select(AuditEvent).where(
        AuditEvent.kind == "association.reject")) == 4, 60)


def _count(node: Node, query: object) -> int:
    with node.sessions() as session:
        return len(session.scalars(query).all())  # type: ignore[call-overload]


def test_every_documented_store_status_is_what_a_sender_receives(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """Provoke each status of the C-STORE table of 4.2.6 and compare the set."""
    import io

    from pydicom import dcmread
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    match = re.search(r"<!-- store-statuses -->(.*?)<!-- end -->", _text(), re.S)
    assert match
    documented = {int(code, 16) for code in re.findall(r"\| `([0-9A-F]{4})` \|", match.group(1))}
    node = start_node(make_config(receiver={"max_instance_mb": 0.5}))
    [small] = write_series(tmp_path / "small", SeriesSpec(n_slices=1), seed=51)
    [large] = write_series(tmp_path / "large", SeriesSpec(n_slices=1, rows=512, columns=512),
                           seed=52)
    ds = dcmread(small)
    scu = AE(ae_title="TESTSCU")
    scu.add_requested_context(MRImageStorage)
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", node.receiver.port, ae_title="DICOMNODE")
    assert assoc.is_established
    mr_cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == MRImageStorage)
    echo_cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == Verification)

    def store(dataset: object, context: object, affected: str = MRImageStorage,
              raw: bytes | None = None) -> int:
        request = C_STORE()
        request.MessageID = 7
        request.AffectedSOPClassUID = affected
        request.AffectedSOPInstanceUID = dataset.SOPInstanceUID  # type: ignore[attr-defined]
        request.Priority = 2
        request.DataSet = io.BytesIO(raw if raw is not None else encode(dataset, False, True))  # type: ignore[arg-type]
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            threading.Event().wait(0.001)
        try:
            assoc.dimse.send_msg(request, context.context_id)  # type: ignore[attr-defined]
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        return int(rsp.Status)  # type: ignore[union-attr, arg-type]

    mismatched = dcmread(small)
    mismatched.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT in an MR context
    whole = encode(ds, False, True)
    assert whole is not None
    seen = {store(ds, mr_cx), store(ds, echo_cx), store(mismatched, mr_cx),
            store(dcmread(large), mr_cx), store(ds, mr_cx, raw=whole[:-3000])}
    assoc.release()
    assert seen == documented


def test_the_tls_policy_of_the_statement_holds_on_a_running_node(
        make_config: Callable[..., NodeConfig], start_node: Callable[[NodeConfig], Node],
        pki: Pki) -> None:  # noqa: F811
    """4.3: TLS on the receiver; DCMTK's echoscu with a site certificate is served, a plain
    TCP caller and a caller without a trusted certificate get nothing; the documented
    minimum version is the default one."""
    import ssl
    import subprocess

    from dicom_node.config import TlsConfig
    from dicom_node.net.tls import server_context
    from tests.conftest import require_tool

    assert _marked_value("tls-min-version") == TlsConfig().min_version == "TLSv1.2"
    node = start_node(make_config(tls={
        "enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
        "ca_file": str(pki.ca), "require_client_cert": True}))
    assert server_context(node.config.tls).minimum_version == ssl.TLSVersion.TLSv1_2

    def echo(*tls: str) -> int:
        return subprocess.run([require_tool("echoscu"), "-aet", "TESTSCU", "-aec", "DICOMNODE",
                               *tls, "127.0.0.1", str(node.receiver.port)],
                              capture_output=True, text=True, timeout=120,
                              check=False).returncode

    assert echo("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)) == 0
    assert echo() != 0
    assert echo("+tls", str(pki.other_client_key), str(pki.other_client_cert),
                "+cf", str(pki.ca)) != 0


def test_a_pacs_that_refuses_the_kos_gets_the_rest_of_the_set(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """A destination that accepts no context for the KOS: the KOS is dead-lettered with the
    reason at once, every other output is stored, and the next series is sent as well (a
    KOS it can never take does not head every later batch)."""
    from sqlalchemy import select

    from storage.models import OutboxEntry, OutboxState

    stored: list[str] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            stored.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    pacs = AE(ae_title="PACS")
    for sop_class in (SecondaryCaptureImageStorage, SegmentationStorage, COMPREHENSIVE_3D_SR):
        pacs.add_supported_context(sop_class)
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node = start_node(make_config(destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]))
        for seed in (21, 22):
            source = write_series(tmp_path / f"t1c{seed}", SeriesSpec(n_slices=8), seed=seed)
            assert pynetdicom_send(source, node.receiver.port) == [0] * len(source)

        def entries() -> list[OutboxEntry]:
            with node.sessions() as session:
                return list(session.scalars(select(OutboxEntry)))

        def settled() -> bool:
            rows = entries()
            return (len({r.output_id for r in rows}) >= 2 * (8 + 3)
                    and all(r.state in (OutboxState.SENT, OutboxState.DEAD) for r in rows))

        def series_states() -> list[str]:
            from storage.models import Series
            with node.sessions() as session:
                return [str(x) for x in session.scalars(select(Series.state))]

        assert wait_for(settled, 300), (series_states(), sorted(
            {(str(r.state), r.last_error[:90]) for r in entries()}))
    finally:
        server.shutdown()  # type: ignore[union-attr]
    rows = entries()
    dead = [r for r in rows if r.state == OutboxState.DEAD]
    assert len(dead) == 2 and all("Key Object Selection" in r.last_error for r in dead), \
        [(r.state, r.last_error) for r in rows]
    assert all(r.attempts <= 1 for r in dead)
    assert KOS not in stored and len(stored) == len(rows) - 2
