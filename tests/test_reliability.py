"""Faults: late arrivals, dead destinations, failing inference, the audit chain."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select, update

from dicom_node.config import NodeConfig
from dicom_node.service import Node
from storage.audit import verify_chain
from storage.models import AuditEvent, OutboxEntry, Series
from tests.conftest import PynetdicomPacs, pynetdicom_send, wait_for
from tests.dicom_factory import SeriesSpec, write_series

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _state(node: Node, series_uid: str) -> tuple[str, int] | None:
    with node.sessions() as session:
        row = session.scalars(select(Series).where(Series.series_uid == series_uid)).first()
        return (row.state, row.version) if row else None


def test_late_instance_reopens_series_and_new_report_supersedes_the_old(
        database_url: str,
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    node = start_node(make_config(destinations=[{
        "name": "pacs", "ae_title": pynetdicom_pacs.ae_title, "host": "127.0.0.1",
        "port": pynetdicom_pacs.port}]))
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=11), seed=21)
    first, late = files[:10], files[10:]
    assert pynetdicom_send(first, node.receiver.port) == [0] * 10
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 13, 120)
    assert _state(node, series_uid) == ("done", 1)
    old_sr = next(ds for ds in pynetdicom_pacs.received.read_all() if ds.SOPClassUID == SR_CLASS)

    assert pynetdicom_send(late, node.receiver.port) == [0]
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 13 + 14, 120)
    assert _state(node, series_uid) == ("done", 2)
    received = pynetdicom_pacs.received.read_all()
    reports = [ds for ds in received if ds.SOPClassUID == SR_CLASS]
    new_sr = next(ds for ds in reports if ds.SOPInstanceUID != old_sr.SOPInstanceUID)
    predecessor = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    sc_series = {ds.SeriesInstanceUID for ds in received if ds.SOPClassUID == SC_CLASS}
    assert len(sc_series) == 2  # version 2 is a new series, not a duplicate of version 1
    assert sum(1 for ds in received if ds.SOPClassUID == SC_CLASS) == 10 + 11


def test_refused_instances_go_to_dead_letter_and_can_be_retried(
        database_url: str,
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    refusing = PynetdicomPacs(tmp_path / "refusing", ae_title="REFUSER")
    refusing._on_store = lambda event: 0xA900  # type: ignore[method-assign]
    refusing.start()
    good = PynetdicomPacs(tmp_path / "good", ae_title="GOOD").start()
    try:
        node = start_node(make_config(destinations=[
            {"name": "refuser", "ae_title": "REFUSER", "host": "127.0.0.1", "port": refusing.port},
            {"name": "good", "ae_title": "GOOD", "host": "127.0.0.1", "port": good.port}]))
        files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=22)
        assert pynetdicom_send(files, node.receiver.port) == [0] * 8
        # the refusing PACS does not hold up the good one
        assert wait_for(lambda: len(good.received.files()) == 11, 120)

        def states(name: str) -> set[str]:
            with node.sessions() as session:
                return set(session.scalars(select(OutboxEntry.state).where(
                    OutboxEntry.destination == name)).all())

        assert wait_for(lambda: states("refuser") == {"dead"}, 60)
        with node.sessions() as session:
            entry = session.scalars(select(OutboxEntry).where(
                OutboxEntry.destination == "refuser")).first()
            assert entry is not None and entry.attempts == 1  # no pointless retries
            assert entry.last_status == 0xA900
        # an admin fixes the PACS and re-queues the dead letters
        refusing.stop()
        fixed = PynetdicomPacs(tmp_path / "fixed", ae_title="REFUSER", port=refusing.port).start()
        try:
            from dicom_node.outbox.admin import retry_dead

            with node.audit.transaction() as session:
                assert retry_dead(session, node.audit, destination="refuser") == 11
            assert wait_for(lambda: len(fixed.received.files()) == 11, 60)
            assert wait_for(lambda: states("refuser") == {"sent"}, 30)
        finally:
            fixed.stop()
    finally:
        good.stop()
        refusing.stop()


def test_inference_failure_is_retried_with_a_smaller_batch_then_recorded(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    # SQLite only: the retries are the predictor's, in memory; the database only records
    # the job's outcome, as in every test that runs on both backends.
    node = start_node(make_config(model={"batch_size": 8}))
    calls: list[int] = []
    real = node.ctx.predictor.run_network

    def flaky(grey, progress=None, batch_size=None, **kwargs):
        calls.append(batch_size or node.ctx.predictor.batch_size)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(grey, progress, batch_size, **kwargs)

    node.ctx.predictor.run_network = flaky  # type: ignore[method-assign, assignment]
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=23)
    assert pynetdicom_send(files, node.receiver.port) == [0] * 8
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert wait_for(lambda: (_state(node, series_uid) or ("", 0))[0] == "done", 120)
    assert calls[0] == 8 and calls[1] < 8

    # a job that always fails is marked failed with the reason; the worker goes on
    def broken(grey, progress=None, batch_size=None, **kwargs):
        raise ValueError("weights produce NaN")

    node.ctx.predictor.run_network = broken  # type: ignore[method-assign, assignment]
    bad = write_series(tmp_path / "bad", SeriesSpec(n_slices=8, description="T1 +C ax b"), seed=24)
    assert pynetdicom_send(bad, node.receiver.port) == [0] * 8
    bad_uid = str(dcmread(bad[0]).SeriesInstanceUID)
    assert wait_for(lambda: (_state(node, bad_uid) or ("", 0))[0] == "failed", 120)
    with node.sessions() as session:
        reasons = [e.detail for e in session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "job.fail", AuditEvent.series_uid == bad_uid)).all()]
    assert any("weights produce NaN" in r for r in reasons)
    node.ctx.predictor.run_network = real  # type: ignore[method-assign]
    later = write_series(tmp_path / "later", SeriesSpec(n_slices=8, description="T1 +C ax c"),
                         seed=25)
    assert pynetdicom_send(later, node.receiver.port) == [0] * 8
    later_uid = str(dcmread(later[0]).SeriesInstanceUID)
    assert wait_for(lambda: (_state(node, later_uid) or ("", 0))[0] == "done", 120)


def test_audit_chain_verifies_and_detects_tampering(
        database_url: str,
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    node = start_node(make_config())
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=3), seed=26)
    assert pynetdicom_send(files, node.receiver.port) == [0] * 3
    with node.sessions() as session:
        check = verify_chain(session)
        assert check.ok and check.events > 5
        victim = session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "instance.stored")).first()
        assert victim is not None
        session.execute(update(AuditEvent).where(AuditEvent.id == victim.id)
                        .values(detail=victim.detail.replace("false", "true")))
        session.commit()
        broken = verify_chain(session)
    assert not broken.ok and broken.first_broken_id == victim.id


def test_retention_deletes_only_what_was_delivered(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    # SQLite only: the two nodes are told apart by their data_dir, each with its own
    # database file; on one PostgreSQL database they would share (and send) each other's
    # rows. Retention's queries run on PostgreSQL in test_admin's counters test.
    from dicom_node.config import RetentionConfig
    from dicom_node.outbox.retention import apply_retention

    down = PynetdicomPacs(tmp_path / "down", ae_title="DOWN")  # never started
    node = start_node(make_config(destinations=[
        {"name": "pacs", "ae_title": pynetdicom_pacs.ae_title, "host": "127.0.0.1",
         "port": pynetdicom_pacs.port}]))
    delivered = write_series(tmp_path / "a", SeriesSpec(n_slices=8), seed=27)
    assert pynetdicom_send(delivered, node.receiver.port) == [0] * 8
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 11, 120)
    with node.sessions() as session:
        assert wait_for(lambda: {e for e in session.scalars(select(OutboxEntry.state)).all()}
                        == {"sent"}, 30)
    store = node.config.store_dir
    assert len(list((store / "incoming").rglob("*.dcm"))) == 8
    immediately = RetentionConfig(incoming_h=1e-9, outputs_h=1e-9)
    with node.audit.transaction() as session:
        assert apply_retention(session, node.audit, immediately) == (8, 11)
    assert list((store / "incoming").rglob("*.dcm")) == []
    assert list((store / "outputs").rglob("*.dcm")) == []

    # undelivered results keep their source and outputs
    node2 = start_node(make_config(destinations=[
        {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": down.port}],
        node={"data_dir": str(tmp_path / "node2")}))
    pending = write_series(tmp_path / "b", SeriesSpec(n_slices=8), seed=28)
    assert pynetdicom_send(pending, node2.receiver.port) == [0] * 8
    uid = str(dcmread(pending[0]).SeriesInstanceUID)
    assert wait_for(lambda: (_state(node2, uid) or ("", 0))[0] == "done", 120)
    with node2.audit.transaction() as session:
        assert apply_retention(session, node2.audit, immediately) == (0, 0)
    assert len(list((node2.config.store_dir / "incoming").rglob("*.dcm"))) == 8


def test_low_disk_refuses_with_out_of_resources_and_writes_nothing(
        database_url: str, tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    node = start_node(make_config(receiver={"min_free_disk_mb": 1e12}))  # 1 EB watermark
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=3), seed=29)
    assert pynetdicom_send(files, node.receiver.port) == [0xA700] * 3
    assert list(node.config.store_dir.rglob("*.dcm")) == []
    with node.sessions() as session:
        refused = session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "instance.refused")).all()
    assert len(refused) == 3 and all("free disk" in e.detail for e in refused)


def test_warning_statuses_are_stored_and_transient_failures_retried(
        database_url: str,
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    warns = PynetdicomPacs(tmp_path / "warns", ae_title="WARNS")
    warns._on_store = lambda event: 0xB000  # type: ignore[method-assign]
    warns.start()
    busy = PynetdicomPacs(tmp_path / "busy", ae_title="BUSY")
    answers = iter([0xA700] * 3)  # out of resources three times, then fine
    real_store = busy._on_store
    busy._on_store = lambda event: next(answers, None) or real_store(event)  # type: ignore[method-assign]
    busy.start()
    try:
        node = start_node(make_config(destinations=[
            {"name": "warns", "ae_title": "WARNS", "host": "127.0.0.1", "port": warns.port},
            {"name": "busy", "ae_title": "BUSY", "host": "127.0.0.1", "port": busy.port}]))
        files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=30)
        assert pynetdicom_send(files, node.receiver.port) == [0] * 8

        def states(name: str) -> list[str]:
            with node.sessions() as session:
                return list(session.scalars(select(OutboxEntry.state).where(
                    OutboxEntry.destination == name)).all())

        assert wait_for(lambda: states("warns") == ["sent"] * 11, 120)
        assert wait_for(lambda: states("busy") == ["sent"] * 11, 120)
        assert len(busy.received.files()) == 11
        with node.sessions() as session:
            attempts = session.scalars(select(AuditEvent).where(
                AuditEvent.kind == "send.attempt")).all()
        warned = [e for e in attempts if "WARNS" in e.peer]
        assert warned and all(e.outcome == "warning" for e in warned)
        retried = [e for e in attempts if "BUSY" in e.peer and e.outcome == "error"]
        assert len(retried) == 3 and all("0xA700" in e.detail for e in retried)
    finally:
        warns.stop()
        busy.stop()
