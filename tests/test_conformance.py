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

STATEMENT = REPO / "docs" / "conformance-statement.md"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
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
                      ComprehensiveSRStorage):
        pacs.add_supported_context(sop_class)
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)])
    try:
        node = start_node(make_config(destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]))
        source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=21)
        assert pynetdicom_send(source, node.receiver.port) == [0] * len(source)
        assert wait_for(lambda: len(stored) >= len(source) + 2, 120)
    finally:
        server.shutdown()

    text = _text()
    assert set(proposed) == {SecondaryCaptureImageStorage, SegmentationStorage,
                             COMPREHENSIVE_3D_SR}
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

    from dicom_node.receiver import ACCEPTED_TRANSFER_SYNTAXES

    missing = [UID(ts).name for ts in ACCEPTED_TRANSFER_SYNTAXES
               if not get_decoder(UID(ts)).is_available]
    assert missing == []
