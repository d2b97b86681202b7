"""The batched instance recorder: group commit, release barrier, start-up recovery."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.config import NodeConfig
from dicom_node.ingest.instance_recorder import InstanceRecorder, ReceivedInstance
from dicom_node.service import Node
from storage.audit import AuditKind, AuditLog, verify_chain
from storage.database import make_engine, make_session_factory
from storage.models import AuditEvent, Instance, Series, SeriesState, utcnow
from tests.conftest import (
    PynetdicomPacs,
    free_port,
    pynetdicom_send,
    storescu,
    subprocess_node_toml,
    wait_for,
)
from tests.dicom_factory import SeriesSpec, write_series


def _instances(node: Node, series_uid: str) -> list[Instance]:
    with node.sessions() as session:
        return list(session.scalars(select(Instance).join(Series, Instance.series_id == Series.id)
                                    .where(Series.series_uid == series_uid)))


def test_rows_committed_before_the_release_completes(
        database_url: str,
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
        database_url: str,
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """Instances that arrive while a batch commits are committed together: recording
    one batch of N submitted items gives N rows and N audit events."""
    files = write_series(tmp_path / "series", SeriesSpec(n_slices=12), seed=4)
    node = start_node(make_config(series={"stable_after_s": 3600.0}))
    recorder = node.receiver.recorder
    recorder.stop()  # nothing drains the queue: we commit by hand below
    from dicom_node.ingest.instance_header import read_instance_header
    from dicom_node.ingest.receiver import received_instance

    items = []
    for index, path in enumerate(files):
        target = tmp_path / "store" / f"{index}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        header = read_instance_header(target)
        items.append(received_instance(header, str(target), target.stat().st_size,
                                       str(dcmread(target).file_meta.TransferSyntaxUID),
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


def test_receive_only_process_beside_the_node(
        tmp_path: Path, test_weights: Path, pynetdicom_pacs: PynetdicomPacs) -> None:
    """With ``receiver.extra_ports = [P]``, ``dicom-node serve`` starts ``dicom-node
    receive --port P`` (a second process on the same database and store), which takes
    two series from two storescu senders while the node takes a third; the node
    processes all three and delivers their results, the audit chain both processes
    appended to stays intact, and stopping the node stops the receive process."""
    port, second_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(subprocess_node_toml(
        tmp_path / "node", port, test_weights, "STORESCU", pynetdicom_pacs.ae_title,
        pynetdicom_pacs.port, extra_ports=(second_port,)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config",
                               str(config)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)]
    try:
        assert wait_for(lambda: _listening(port) and _listening(second_port), 120, 1.0)
        series = [write_series(tmp_path / f"s{i}", SeriesSpec(n_slices=12, patient_id=f"P{i}"),
                               seed=10 + i) for i in range(3)]
        results: list[subprocess.CompletedProcess[str]] = []
        senders = [threading.Thread(target=lambda f, p: results.append(storescu(f, p)),
                                    args=(files, p))
                   for files, p in zip(series, (second_port, second_port, port), strict=True)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
        # 12 SC + SEG + SR + KOS per series (and the image SR when a lesion is found)
        assert wait_for(lambda: len(pynetdicom_pacs.received.files()) >= 3 * 15, 180, 0.5)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    assert all(proc.returncode == 0 for proc in procs), [p.stderr.read() for p in procs if p.stderr]
    assert not _listening(second_port)  # the receive process ended with the node
    studies = {str(ds.StudyInstanceUID) for ds in pynetdicom_pacs.received.read_all()}
    assert studies == {str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                       for files in series}
    engine = make_engine(f"sqlite:///{tmp_path / 'node' / 'dicom-node.db'}")
    with make_session_factory(engine)() as session:
        assert verify_chain(session).ok
        starts = list(session.scalars(select(AuditEvent.detail).where(
            AuditEvent.kind == AuditKind.NODE_START)))
        assert any("receive-only" in detail for detail in starts)
        # the full node warmed its model and writers up before it took the first series
        assert any("model_warm_up_s" in detail and "writers_warm_up_s" in detail
                   for detail in starts)
        assert session.scalar(select(func.count()).select_from(Instance)) == 36
    engine.dispose()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _item(tmp_path: Path, sop: str, series: str, name: str) -> ReceivedInstance:
    path = tmp_path / name
    path.write_bytes(b"DICM")
    return ReceivedInstance(
        study_uid="1.2.3", series_uid=series, sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=str(path), size_bytes=4, patient_id="P1", accession_number="A1", modality="MR",
        description="T1 +C", instance_number=1, position_mm=0.0, images_in_acquisition=None,
        calling_ae="SCU", peer_address="127.0.0.1", peer="SCU@127.0.0.1:1",
        association_id=None, received_at=utcnow())


def test_one_batch_with_repeats_and_moves_keeps_counts_and_chain(
        database_url: str, tmp_path: Path) -> None:
    """A SOP Instance UID twice in one batch is one row (the later copy); one re-sent in
    another series within the batch moves there; counts, files and audit chain agree."""
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    recorder = InstanceRecorder(AuditLog(sessions))
    recorder.record([_item(tmp_path, "1.9.1", "1.5.1", "a.dcm"),
                     _item(tmp_path, "1.9.2", "1.5.1", "b.dcm"),
                     _item(tmp_path, "1.9.1", "1.5.1", "a2.dcm"),   # repeat, new file
                     _item(tmp_path, "1.9.2", "1.5.2", "b2.dcm"),   # moves to series 2
                     _item(tmp_path, "1.9.3", "1.5.2", "c.dcm")])
    recorder.record([_item(tmp_path, "1.9.3", "1.5.1", "c2.dcm")])  # moves back, next batch
    with sessions() as session:
        rows = {r.sop_uid: r for r in session.scalars(select(Instance))}
        series = {s.series_uid: s for s in session.scalars(select(Series))}
        assert sorted(rows) == ["1.9.1", "1.9.2", "1.9.3"]
        assert Path(rows["1.9.1"].path).name == "a2.dcm"
        assert rows["1.9.2"].series_id == series["1.5.2"].id
        assert rows["1.9.3"].series_id == series["1.5.1"].id
        assert (series["1.5.1"].instance_count, series["1.5.2"].instance_count) == (2, 1)
        events = list(session.scalars(select(AuditEvent).where(
            AuditEvent.kind == AuditKind.INSTANCE_STORED).order_by(AuditEvent.id)))
        assert [e.sop_uid for e in events] == ["1.9.1", "1.9.2", "1.9.1", "1.9.2", "1.9.3",
                                              "1.9.3"]
        assert '"moved_from_series": "1.5.1"' in events[3].detail
        assert verify_chain(session).ok
    # Replaced copies are deleted once no row points at them.
    assert not (tmp_path / "a.dcm").exists() and not (tmp_path / "b.dcm").exists()
    assert not (tmp_path / "c.dcm").exists() and (tmp_path / "c2.dcm").exists()
