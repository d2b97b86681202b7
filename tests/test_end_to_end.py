"""The node end to end over loopback with real DICOM peers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, SegmentationStorage
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.service import Node
from dicom_node.writers.kos import listed_instances
from storage.models import AuditEvent, OutboxEntry, Series
from tests.conftest import (
    DcmtkStorescp,
    PynetdicomPacs,
    pynetdicom_send,
    storescu,
    validate_dicom,
    wait_for,
    written_outputs,
)
from tests.dicom_factory import SeriesSpec, write_series
from tests.weights_factory import make_test_weights

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _series_state(node: Node, series_uid: str) -> str | None:
    with node.sessions() as session:
        series = session.scalars(select(Series).where(Series.series_uid == series_uid)).first()
        return series.state if series else None


def _check_outputs(files: list[Path], source: list[Path]) -> None:
    """One SC per slice, one SR, one SEG, one KOS listing them all, all in the source
    study, all valid DICOM."""
    src = [dcmread(p) for p in source]
    study_uid = src[0].StudyInstanceUID
    outputs = [dcmread(p) for p in files]
    sc = [ds for ds in outputs if ds.SOPClassUID == SecondaryCaptureImageStorage]
    sr = [ds for ds in outputs if ds.SOPClassUID == COMPREHENSIVE_3D_SR]
    seg = [ds for ds in outputs if ds.SOPClassUID == SegmentationStorage]
    assert len(sc) == len(src)
    assert len(sr) == 1
    assert len(seg) == 1
    (kos,) = [ds for ds in outputs if ds.SOPClassUID == KOS]
    assert listed_instances(kos) == {str(ds.SOPInstanceUID) for ds in outputs} - {
        str(kos.SOPInstanceUID)}
    assert {ds.StudyInstanceUID for ds in outputs} == {study_uid}
    # each SC points at its own source slice, is labelled synthetic and carries provenance
    source_uids = {str(ds.SOPInstanceUID) for ds in src}
    referenced = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in sc}
    assert referenced == source_uids
    for ds in sc:
        assert ds.BurnedInAnnotation == "YES"
        assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
        assert ds.ImageType[0] == "DERIVED"
        assert ds.pixel_array.shape == (src[0].Rows, src[0].Columns, 3)
        equipment = ds.ContributingEquipmentSequence[0]
        assert "sha256" in equipment.ContributionDescription
    assert sr[0].SOPClassUID != ComprehensiveSRStorage  # the 3D variant, as specified
    result = validate_dicom(files[0].parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dcmtk_storescu_to_node_to_dcmtk_storescp(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], dcmtk_storescp: DcmtkStorescp) -> None:
    config = make_config(destinations=[{"name": "pacs", "ae_title": dcmtk_storescp.ae_title,
                                        "host": "127.0.0.1", "port": dcmtk_storescp.port}])
    node = start_node(config)
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=12), seed=1)
    sent = storescu(source, node.receiver.port)
    assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(dcmtk_storescp.files()) >= len(source) + 3, 180)
    _check_outputs(dcmtk_storescp.files(), source)
    series_uid = str(dcmread(source[0]).SeriesInstanceUID)
    assert _series_state(node, series_uid) == "done"
    with node.sessions() as session:
        kinds = set(session.scalars(select(AuditEvent.kind)).all())
        entries = session.scalars(select(OutboxEntry)).all()
    assert {"association.accept", "instance.stored", "series.state", "job.start",
            "job.finish", "send.attempt"} <= kinds
    assert entries and all(e.state == "sent" for e in entries)


def test_pynetdicom_sender_and_receiver(
        database_url: str,
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    config = make_config(destinations=[{"name": "pacs", "ae_title": pynetdicom_pacs.ae_title,
                                        "host": "127.0.0.1", "port": pynetdicom_pacs.port}])
    node = start_node(config)
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=10), seed=2)
    assert pynetdicom_send(source, node.receiver.port) == [0] * len(source)
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) >= len(source) + 3, 180)
    _check_outputs(pynetdicom_pacs.received.files(), source)
    # Sent as written (explicit VR): a pynetdicom peer prefers implicit VR, so this holds
    # only when each transfer syntax is proposed in a context of its own.
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in pynetdicom_pacs.received.read_all()
            } == {"1.2.840.10008.1.2.1"}


def test_uptake_model_output_is_fused_over_the_t1c(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    """A model with a 1-channel uptake output (the shipped demo model's kind): the node
    draws the fusion itself over the native T1C, and the outputs are the same set."""
    weights = tmp_path / "uptake-generator.pt"
    sha = make_test_weights(weights, output_kind="uptake", seed=5)
    config = make_config(model={"weights_path": str(weights)},
                         destinations=[{"name": "pacs", "ae_title": pynetdicom_pacs.ae_title,
                                        "host": "127.0.0.1", "port": pynetdicom_pacs.port}])
    node = start_node(config)
    assert node.ctx.predictor.model.card.output_kind == "uptake"
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=10), seed=6)
    assert pynetdicom_send(source, node.receiver.port) == [0] * len(source)
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) >= len(source) + 3, 180)
    _check_outputs(pynetdicom_pacs.received.files(), source)
    sc = [ds for ds in pynetdicom_pacs.received.read_all()
          if ds.SOPClassUID == SecondaryCaptureImageStorage]
    assert all(sha in ds.ContributingEquipmentSequence[0].ContributionDescription for ds in sc)
    # the stochastic passes behind the TBR intervals ran (analysis.uncertainty_samples = 4
    # by default), and the report says how the intervals were made
    sr = next(ds for ds in pynetdicom_pacs.received.read_all()
              if ds.SOPClassUID == COMPREHENSIVE_3D_SR)
    texts: list[str] = []

    def walk(node) -> None:
        for item in node.get("ContentSequence", []):
            if item.ValueType == "TEXT":
                texts.append(str(item.TextValue))
            walk(item)

    walk(sr)
    assert any(t.startswith("interval: 90% interval: 4 passes of Monte Carlo dropout")
               for t in texts), texts


def test_non_t1c_series_are_stored_and_skipped_with_reason(
        database_url: str,
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    node = start_node(make_config())
    t2 = write_series(tmp_path / "t2", SeriesSpec(n_slices=10, description="T2 TSE ax"), seed=3)
    sagittal = write_series(tmp_path / "sag", SeriesSpec(
        n_slices=10, description="T1 +C 3D", orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0)), seed=4)
    for files in (t2, sagittal):
        assert pynetdicom_send(files, node.receiver.port) == [0] * len(files)
    uids = [str(dcmread(files[0]).SeriesInstanceUID) for files in (t2, sagittal)]
    assert wait_for(lambda: all(_series_state(node, uid) == "skipped" for uid in uids), 60)
    with node.sessions() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.kind == "series.state")).all()
    reasons = {e.series_uid: json.loads(e.detail)["reason"] for e in events
               if json.loads(e.detail)["to"] == "skipped"}
    assert "T2 TSE ax" in reasons[uids[0]] and "rule" in reasons[uids[0]]
    assert "not axial" in reasons[uids[1]]
    # stored, not lost
    stored = list((config_store(node) / "incoming").rglob("*.dcm"))
    assert len(stored) == len(t2) + len(sagittal)


def config_store(node: Node) -> Path:
    return node.config.store_dir


def test_unknown_calling_ae_is_rejected_and_audited(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    node = start_node(make_config())
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=2), seed=5)
    result = storescu(source, node.receiver.port, calling_ae="INTRUDER")
    assert result.returncode != 0
    with node.sessions() as session:
        rejects = session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "association.reject")).all()
        stored = session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "instance.stored")).all()
    assert len(rejects) == 1 and "INTRUDER" in rejects[0].peer
    assert "not a known peer" in rejects[0].detail
    assert stored == []


def test_destination_down_keeps_results_in_outbox_until_it_is_up(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    pacs = PynetdicomPacs(tmp_path / "late-pacs")  # port chosen, nothing listening yet
    config = make_config(destinations=[{"name": "pacs", "ae_title": pacs.ae_title,
                                        "host": "127.0.0.1", "port": pacs.port}])
    node = start_node(config)
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=6)
    assert pynetdicom_send(source, node.receiver.port) == [0] * len(source)

    def failed_attempts() -> int:
        with node.sessions() as session:
            return len(session.scalars(select(OutboxEntry).where(
                OutboxEntry.attempts >= 1, OutboxEntry.state == "pending")).all())

    def expected() -> int:  # SC per slice, SEG, SR, KOS (+ the image SR with a lesion)
        with node.sessions() as session:
            return max(len(source) + 3, written_outputs(session))

    assert wait_for(lambda: failed_attempts() == expected(), 120)
    pacs.start()
    try:
        assert wait_for(lambda: len(pacs.received.files()) == expected(), 120)
        # the PACS has every file; the sender commits "sent" right after: wait for it

        def states() -> set[str]:
            with node.sessions() as session:
                return set(session.scalars(select(OutboxEntry.state)).all())

        assert wait_for(lambda: states() == {"sent"}, 60), states()
    finally:
        pacs.stop()


def test_complete_series_goes_early_and_an_incomplete_one_waits(
        database_url: str,
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    node = start_node(make_config(series={"stable_after_s": 3600.0, "complete_grace_s": 0.5}))
    complete = write_series(tmp_path / "complete", SeriesSpec(n_slices=10), seed=7)
    gappy = write_series(tmp_path / "gappy", SeriesSpec(n_slices=10, description="T1 +C ax 2"),
                         seed=8)
    del gappy[5]  # a missing slice in the middle: not geometrically complete
    assert pynetdicom_send(gappy, node.receiver.port) == [0] * len(gappy)
    assert pynetdicom_send(complete, node.receiver.port) == [0] * len(complete)
    complete_uid = str(dcmread(complete[0]).SeriesInstanceUID)
    gappy_uid = str(dcmread(gappy[0]).SeriesInstanceUID)
    assert wait_for(lambda: _series_state(node, complete_uid) == "done", 120)
    # the complete series was processed long before its quiet period; the gappy one waits
    assert _series_state(node, gappy_uid) == "receiving"
    with node.sessions() as session:
        ready = [e for e in session.scalars(select(AuditEvent).where(
            AuditEvent.series_uid == complete_uid, AuditEvent.kind == "series.state")).all()
            if json.loads(e.detail)["to"] == "ready"]
    assert "geometrically complete" in json.loads(ready[0].detail)["reason"]


def test_geometric_completeness_rules() -> None:
    from dicom_node.series.tracking import geometrically_complete

    assert geometrically_complete([0.0, 2.0, 4.0, 6.0], None, 4)
    assert not geometrically_complete([0.0, 2.0, 6.0, 8.0], None, 4)  # a gap
    assert not geometrically_complete([0.0, 2.0, 4.0, None], None, 4)  # unknown position
    assert not geometrically_complete([0.0, 2.0, 4.0, 6.0], 5, 4)  # fewer than acquired
    assert not geometrically_complete([0.0, 2.0, 4.0], None, 4)  # below min slices


def test_spoofed_ae_title_from_the_wrong_address_is_rejected(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    # STORESCU is allowed, but only from 127.0.0.2; the test connects from 127.0.0.1
    node = start_node(make_config(peers=[{"ae_title": "STORESCU", "addresses": ["127.0.0.2"]}]))
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=2), seed=9)
    for _ in range(3):
        assert storescu(source, node.receiver.port, calling_ae="STORESCU").returncode != 0
    with node.sessions() as session:
        rejects = session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "association.reject")).all()
        stored = session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "instance.stored")).all()
    assert len(rejects) == 3 and stored == []
    assert "unexpected address 127.0.0.1" in rejects[0].detail
    assert [json.loads(e.detail)["rejections_last_minute"] for e in rejects] == [1, 2, 3]


def test_no_patient_names_in_application_logs(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    caplog.set_level(logging.DEBUG, logger="storage")
    node = start_node(make_config(destinations=[{
        "name": "pacs", "ae_title": pynetdicom_pacs.ae_title, "host": "127.0.0.1",
        "port": pynetdicom_pacs.port}]))
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8, patient_name="ZEBRAFINCH^ODETTE"),
                          seed=10)
    assert pynetdicom_send(source, node.receiver.port) == [0] * 8
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 11, 120)
    assert caplog.records, "the node should have logged something"
    assert "ZEBRAFINCH" not in caplog.text.upper()
    # ...while the outputs do carry the name (it is the same patient)
    assert str(pynetdicom_pacs.received.read_all()[0].PatientName) == "ZEBRAFINCH^ODETTE"
