"""The sender keeps C-STORE responses that pynetdicom's reactor takes by mistake
(``net.ae.keep_responses``), so a send never waits out the DIMSE timeout for a response
that did arrive."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.config import NodeConfig
from dicom_node.net.ae import keep_responses
from dicom_node.service import Node
from tests.conftest import DcmtkStorescp, free_port, pynetdicom_send, wait_for
from tests.dicom_factory import SeriesSpec, write_series

MR_CLASS = "1.2.840.10008.5.1.4.1.1.4"


def associate(port: int) -> Association:
    ae = AE(ae_title="RACER")
    ae.dimse_timeout = 2
    ae.add_requested_context(MR_CLASS, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    assert assoc.is_established
    return assoc


def taken_by_the_reactor(assoc: Association) -> C_STORE:
    """What the reactor does when it wins the race: it hands the C-STORE response that
    arrived for a waiting request to ``_serve_request``."""
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = MR_CLASS
    rsp.AffectedSOPInstanceUID = "1.2.3.4"
    rsp.Status = 0x0000
    assoc._serve_request(rsp, 1)
    return rsp


def test_a_response_taken_by_the_reactor_reaches_the_waiting_request(
        tmp_path: Path, dcmtk_storescp: DcmtkStorescp) -> None:
    assoc = associate(dcmtk_storescp.port)
    try:
        keep_responses(assoc)
        rsp = taken_by_the_reactor(assoc)
        assert assoc.dimse.get_msg(block=True) == (1, rsp)  # what send_c_store waits on
        # the association goes on storing as before
        files = write_series(tmp_path / "mr", SeriesSpec(n_slices=3, rows=32, columns=32),
                             seed=41)
        assert [int(assoc.send_c_store(path).Status) for path in files] == [0, 0, 0]
    finally:
        assoc.release()
    assert len(dcmtk_storescp.files()) == 3


def test_without_it_pynetdicom_drops_the_response(
        dcmtk_storescp: DcmtkStorescp, caplog: pytest.LogCaptureFixture) -> None:
    """The control: the pinned pynetdicom loses such a response."""
    assoc = associate(dcmtk_storescp.port)
    try:
        with caplog.at_level(logging.WARNING, logger="pynetdicom"):
            taken_by_the_reactor(assoc)
        assert "Received unexpected C-STORE service message" in caplog.text
        assert assoc.dimse.get_msg(block=True) == (None, None)  # waited out the timeout
    finally:
        assoc.release()


def test_a_failed_send_is_one_named_line_not_pynetdicom_s_anonymous_errors(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], caplog: pytest.LogCaptureFixture) -> None:
    """The operator's console: a destination that refuses connections gives the sender's
    line, with the destination and the real reason, and none of pynetdicom's
    'Association request failed' / 'TCP Initialisation Error' lines that name nobody."""
    caplog.set_level(logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # as `dicom-node serve` sets it
    node = start_node(make_config(destinations=[{
        "name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": free_port()}]))
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=12)
    assert set(pynetdicom_send(source, node.receiver.port)) == {0}

    def warned() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "dicom_node.outbox.sender"
                and r.levelno == logging.WARNING and "archive" in r.getMessage()]

    assert wait_for(lambda: bool(warned()), 120)
    assert "connection refused" in warned()[0].getMessage().lower()
    anonymous = [r for r in caplog.records if r.name.startswith("pynetdicom")
                 and r.levelno >= logging.ERROR]
    assert anonymous == [], [r.getMessage() for r in anonymous]
