"""What the PACS ends up holding: one result set per series version, never a partial
one, never a duplicate from a resend, and a re-run that says it is one."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.service import Node
from storage.models import AuditEvent, Job, OutboxEntry, OutputInstance, Series
from tests.conftest import PynetdicomPacs, wait_for
from tests.dicom_factory import SeriesSpec, write_series
from tests.test_bad_input import send


def _series(node: Node, series_uid: str) -> Series | None:
    with node.sessions() as session:
        return session.scalars(select(Series).where(Series.series_uid == series_uid)).first()


def _state(node: Node, series_uid: str) -> str:
    row = _series(node, series_uid)
    return row.state if row else ""


def test_invalid_geometry_is_skipped_at_selection_and_sends_nothing(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.series.tracking")
    node = start_node(make_config(destinations=[{
        "name": "pacs", "ae_title": pynetdicom_pacs.ae_title, "host": "127.0.0.1",
        "port": pynetdicom_pacs.port}]))
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=10), seed=41)
    for path in files:
        ds = dcmread(path)
        ds.PixelSpacing = [0, -1]
        ds.save_as(path)
    assert send(files, node.receiver.port) == [0] * 10
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert wait_for(lambda: _state(node, series_uid) == "skipped", 120)
    row = _series(node, series_uid)
    assert row is not None and "PixelSpacing" in row.state_reason
    # the operator's log names the series (patient-free) once per milestone
    lines = [r.getMessage() for r in caplog.records if series_uid[-12:] in r.getMessage()]
    assert [line.split(": ")[0].split()[-1] for line in lines] == ["ready", "skipped"], lines
    assert "PixelSpacing" in lines[-1] and "TEST^PATIENT" not in " ".join(lines)
    with node.sessions() as session:
        assert session.scalars(select(Job)).all() == []
        assert session.scalars(select(OutboxEntry)).all() == []
    assert pynetdicom_pacs.received.files() == []


def test_a_series_cut_off_mid_transfer_waits_for_the_resend_and_is_processed_once(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    node = start_node(make_config(
        series={"stable_after_s": 1.0, "complete_grace_s": 0.0, "interrupted_wait_s": 3600.0},
        destinations=[{"name": "pacs", "ae_title": pynetdicom_pacs.ae_title,
                       "host": "127.0.0.1", "port": pynetdicom_pacs.port}]))
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=12), seed=42)
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert send(files, node.receiver.port, abort_after=6) == [0] * 6
    # Another series, complete and released, quiet for stable_after_s: once it is done,
    # every sweep that made it ready also found the cut-off series quiet for as long.
    other = write_series(tmp_path / "other", SeriesSpec(n_slices=10, description="T1 +C 2"),
                         seed=43)
    assert send(other, node.receiver.port) == [0] * 10
    other_uid = str(dcmread(other[0]).SeriesInstanceUID)
    assert wait_for(lambda: _state(node, other_uid) == "done", 120)
    assert _state(node, series_uid) == "receiving"  # waiting for the sender's resend
    # the sender retries the whole series: six identical instances, six new ones
    assert send(files, node.receiver.port) == [0] * 12
    assert wait_for(lambda: _state(node, series_uid) == "done", 120)
    with node.sessions() as session:
        series = session.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        jobs = session.scalars(select(Job).where(Job.series_id == series.id)).all()
        outputs = session.scalars(select(OutputInstance).where(
            OutputInstance.source_series_id == series.id)).all()
    assert len(jobs) == 1 and series.version == 1
    assert sorted(o.kind for o in outputs).count("sc") == 12  # one set, whole
    unchanged = [e for e in _stored_events(node, series_uid) if "unchanged" in e.detail]
    assert len(unchanged) == 6


def _stored_events(node: Node, series_uid: str) -> list[AuditEvent]:
    with node.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "instance.stored", AuditEvent.series_uid == series_uid)).all())


def test_a_resend_changes_nothing_and_a_changed_instance_makes_a_labelled_version(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    node = start_node(make_config(destinations=[{
        "name": "pacs", "ae_title": pynetdicom_pacs.ae_title, "host": "127.0.0.1",
        "port": pynetdicom_pacs.port}]))
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=44)
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert send(files, node.receiver.port) == [0] * 8
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 11, 120)
    assert wait_for(lambda: _state(node, series_uid) == "done", 60)
    assert wait_for(lambda: any(r.getMessage().startswith("sent ") and "to pacs (" in
                                r.getMessage() for r in caplog.records), 60)
    assert any(f"{series_uid[-12:]}, 8 instances] done" in r.getMessage()
               for r in caplog.records)
    # a byte-identical resend of one instance, then of the whole series
    assert send(files[3:4], node.receiver.port) == [0]
    assert send(files, node.receiver.port) == [0] * 8
    row = _series(node, series_uid)
    assert row is not None and row.state == "done" and row.version == 1
    # a changed instance (the scanner corrected a slice): version 2, labelled as such
    changed = dcmread(files[3])
    changed.PixelData = bytes(len(changed.PixelData))
    changed.save_as(files[3])
    assert send(files[3:4], node.receiver.port) == [0]
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 22, 120)
    assert wait_for(lambda: _state(node, series_uid) == "done", 60)
    row = _series(node, series_uid)
    assert row is not None and row.version == 2
    received = pynetdicom_pacs.received.read_all()
    by_series: dict[str, list] = {}
    for ds in received:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    labels = sorted({(int(ds.SeriesNumber), str(ds.SeriesDescription)) for ds in received})
    assert len(by_series) == 8 and len(labels) == 8  # eight series, each told apart
    assert sum("(v2)" in description for _, description in labels) == 4
    new_sr = [ds for ds in received if ds.Modality == "SR" and "(v2)" in ds.SeriesDescription]
    old_sr = [ds for ds in received if ds.Modality == "SR" and "(v2)" not in
              ds.SeriesDescription]
    assert len(new_sr) == len(old_sr) == 1
    predecessor = new_sr[0].PredecessorDocumentsSequence[0]
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == old_sr[0].SOPInstanceUID
    with node.sessions() as session:
        written = [json.loads(e.detail) for e in session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "output.written", AuditEvent.series_uid == series_uid)).all()]
    assert [w["version"] for w in written] == [1, 2]
    superseded = {s["series_uid"] for s in written[1]["supersedes"]}
    assert superseded == {str(ds.SeriesInstanceUID) for ds in received
                          if "(v2)" not in ds.SeriesDescription}
