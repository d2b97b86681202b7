"""The batched instance recorder: group commit, release barrier, start-up recovery."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.config import NodeConfig
from dicom_node.service import Node
from storage.audit import AuditKind, verify_chain
from storage.models import AuditEvent, Instance, Series, SeriesState
from tests.conftest import pynetdicom_send, storescu
from tests.dicom_factory import SeriesSpec, write_series


def _instances(node: Node, series_uid: str) -> list[Instance]:
    with node.sessions() as session:
        return list(session.scalars(select(Instance).join(Series, Instance.series_id == Series.id)
                                    .where(Series.series_uid == series_uid)))


def test_rows_committed_before_the_release_completes(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """When storescu exits (its release answered), every instance has its row and its
    audit event, with no wait: the release waits for the recorder."""
    files = write_series(tmp_path / "series", SeriesSpec(n_slices=40), seed=3)
    node = start_node(make_config(series={"stable_after_s": 3600.0}))
    result = storescu(files, node.receiver.port)
    assert result.returncode == 0, result.stderr
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    rows = _instances(node, series_uid)
    assert len(rows) == 40
    assert all(Path(row.path).is_file() for row in rows)
    assert {row.position_mm for row in rows} == {
        float(dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files}
    with node.sessions() as session:
        series = session.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        assert series.instance_count == 40
        assert series.state == SeriesState.RECEIVING
        stored = session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.kind == AuditKind.INSTANCE_STORED, AuditEvent.series_uid == series_uid))
        assert stored == 40
        assert verify_chain(session).ok


def test_instances_batch_into_few_transactions(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """Instances that arrive while a batch commits are committed together: recording
    one batch of N submitted items gives N rows and N audit events."""
    files = write_series(tmp_path / "series", SeriesSpec(n_slices=12), seed=4)
    node = start_node(make_config(series={"stable_after_s": 3600.0}))
    recorder = node.receiver.recorder
    recorder.stop()  # nothing drains the queue: we commit by hand below
    from dicom_node.receiver import HEADER_TAGS, received_instance

    items = []
    for index, path in enumerate(files):
        target = tmp_path / "store" / f"{index}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        header = dcmread(target, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
        items.append(received_instance(header, str(target), target.stat().st_size,
                                       str(header.file_meta.TransferSyntaxUID),
                                       calling_ae="TESTSCU", peer_address="127.0.0.1",
                                       peer="TESTSCU@127.0.0.1:1", association_id=None))
    # the same instance twice in one batch: one row, the second audited as a replacement
    recorder.record([*items, items[0]])
    series_uid = items[0].series_uid
    assert len(_instances(node, series_uid)) == 12
    with node.sessions() as session:
        events = list(session.scalars(select(AuditEvent).where(
            AuditEvent.kind == AuditKind.INSTANCE_STORED, AuditEvent.series_uid == series_uid)
            .order_by(AuditEvent.id)))
        assert len(events) == 13
        assert '"replaced": true' in events[-1].detail
        assert session.scalars(select(Series.instance_count).where(
            Series.series_uid == series_uid)).one() == 12


def test_file_without_row_is_recorded_at_start(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """A node killed after making a file durable and before committing its row loses
    nothing: the next start records the file, audited as recovered, and the series goes
    on to be processed."""
    files = write_series(tmp_path / "series", SeriesSpec(n_slices=16), seed=5)
    config = make_config()
    node = start_node(config)
    statuses = pynetdicom_send(files[:10], node.receiver.port)
    assert statuses == [0] * 10
    node.stop()
    # Simulate the crash window: six more files durable in incoming/, no rows.
    header = dcmread(files[0], stop_before_pixels=True)
    for path in files[10:]:
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        target = node.store.incoming_path(str(header.StudyInstanceUID),
                                          str(header.SeriesInstanceUID), sop)
        shutil.copy(path, target)
    restarted = start_node(config)
    rows = _instances(restarted, str(header.SeriesInstanceUID))
    assert len(rows) == 16
    with restarted.sessions() as session:
        recovered = list(session.scalars(select(AuditEvent).where(
            AuditEvent.kind == AuditKind.INSTANCE_STORED,
            AuditEvent.detail.contains("recovered"))))
        assert len(recovered) == 6
        assert verify_chain(session).ok
    # a second start finds nothing more to recover
    assert restarted.receiver.record_unrecorded_files() == 0
