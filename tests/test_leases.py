"""Claims with leases, on SQLite and PostgreSQL: outbox entries claimed by one sender at
a time and claimed again after a dead sender's lease; a dead worker's job taken over, and
the late worker fenced off (it cannot commit its outputs); a job superseded by a late
instance commits nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from pydicom import Dataset
from sqlalchemy import select, update

from dicom_node.config import NodeConfig
from dicom_node.errors import LeaseLost, Superseded
from dicom_node.jobs import NodeContext, finish
from dicom_node.ops.heartbeat import HeartbeatWriter, NodeIdentity
from dicom_node.outbox.enqueue import enqueue_outputs
from dicom_node.outbox.notifications import claim_next
from dicom_node.outbox.sender import Sender
from dicom_node.series.tracking import recover, renew_leases, reopen, take_over_expired
from storage.audit import AuditLog, verify_chain
from storage.database import make_engine, make_session_factory
from storage.models import (
    Job,
    JobState,
    Notification,
    OutboxEntry,
    OutputInstance,
    Series,
    SeriesState,
    as_utc,
    utcnow,
)
from tests.conftest import wait_for


def _outputs(audit: AuditLog, count: int) -> None:
    with audit.transaction() as session:
        series = Series(series_uid="1.2.3.4", study_uid="1.2.3", state=SeriesState.DONE)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, series_version=1, state=JobState.DONE)
        session.add(job)
        session.flush()
        for n in range(count):
            output = OutputInstance(sop_uid=f"1.2.3.4.9.{n}", sop_class_uid="1.2", kind="sc",
                                    series_uid="1.2.3.4.9", source_series_id=series.id,
                                    series_version=1, job_id=job.id, path=f"/x/{n}.dcm")
            session.add(output)
            session.flush()
            session.add(OutboxEntry(output_id=output.id, destination="pacs", ae_title="PACS",
                                    host="127.0.0.1", port=104))


def test_senders_claim_disjoint_batches_and_a_dead_senders_batch_after_its_lease(
        database_url: str, make_config: Callable[..., NodeConfig]) -> None:
    config = make_config(outbox={"batch_size": 5})
    sessions = make_session_factory(make_engine(config.database_url))
    audit = AuditLog(sessions)
    _outputs(audit, 20)
    senders = [Sender(config, sessions, audit, f"host{n}/sender:104") for n in range(4)]
    claimed: list[list[int]] = []
    threads = [threading.Thread(target=lambda s=s: claimed.append(
        [row[0] for row in s.claim("pacs")])) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    ids = [i for batch in claimed for i in batch]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 20  # each entry once
    assert senders[0].claim("pacs") == []  # all held
    # Sender 0 dies: once its lease has expired, its batch is claimed by another.
    with sessions() as session:
        session.execute(update(OutboxEntry).where(OutboxEntry.claimed_by == senders[0].node_id)
                        .values(lease_until=utcnow() - timedelta(seconds=1)))
        session.commit()
    with sessions() as session:
        dead = sorted(session.scalars(select(OutboxEntry.id).where(
            OutboxEntry.claimed_by == senders[0].node_id)).all())
    assert len(dead) == 5
    assert sorted(row[0] for row in senders[1].claim("pacs")) == dead
    assert senders[1].renew_claims() == 10  # its heartbeat: its own and the retaken batch
    # A restarted sender releases its own claims at once (no wait for the lease).
    assert senders[2].release_own_claims() == 5
    assert len(senders[3].claim("pacs")) == 5


def _running(audit: AuditLog, owner: str, lease_s: float) -> tuple[int, int]:
    with audit.transaction() as session:
        series = Series(series_uid=f"1.2.3.{owner[:1]}", study_uid="1.2.3",
                        state=SeriesState.RUNNING)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, series_version=1, state=JobState.RUNNING, owner=owner,
                  lease_until=utcnow() + timedelta(seconds=lease_s))
        session.add(job)
        session.flush()
        return series.id, job.id


def test_a_dead_workers_job_is_taken_over_and_the_late_worker_cannot_commit(
        database_url: str, tmp_path: Path, make_config: Callable[..., NodeConfig]) -> None:
    config = make_config(destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}])
    sessions = make_session_factory(make_engine(config.database_url))
    audit = AuditLog(sessions)
    dead_series, dead_job = _running(audit, "dead/worker:1", -1.0)  # lease already over
    live_series, live_job = _running(audit, "live/worker:2", 60.0)
    # A worker starting (or restarting) leaves other workers' running jobs alone.
    assert recover(audit, associations=False, owner="me/worker:3") == 0
    assert renew_leases(sessions, "live/worker:2", 60.0) == 1
    assert take_over_expired(audit, "me/worker:3") == 1
    with sessions() as session:
        assert session.get(Series, dead_series).state == SeriesState.QUEUED  # type: ignore[union-attr]
        assert session.get(Job, dead_job).state == JobState.ABANDONED  # type: ignore[union-attr]
        assert session.get(Series, live_series).state == SeriesState.RUNNING  # type: ignore[union-attr]
        assert session.get(Job, live_job).state == JobState.RUNNING  # type: ignore[union-attr]
    ds = Dataset()
    ds.SOPInstanceUID, ds.SOPClassUID, ds.SeriesInstanceUID = "1.2.3.9.1", "1.2", "1.2.3.9"
    # The dead worker comes back and tries to commit its outputs: fenced off.
    with pytest.raises(LeaseLost, match="taken over"):
        enqueue_outputs(config, audit, dead_series, dead_job, 1, [("sc", ds, tmp_path / "x")],
                        None)
    # The live worker commits its own.
    assert enqueue_outputs(config, audit, live_series, live_job, 1,
                           [("sc", ds, tmp_path / "x")], None) == 1
    with sessions() as session:
        assert session.scalars(select(OutputInstance.job_id)).all() == [live_job]
        assert verify_chain(session).ok


def test_the_heartbeat_renews_what_the_node_holds_while_it_runs_and_stops(
        database_url: str, make_config: Callable[..., NodeConfig]) -> None:
    config = make_config()
    sessions = make_session_factory(make_engine(config.database_url))
    audit = AuditLog(sessions)
    _series, job = _running(audit, "me/worker:1", 0.5)
    identity = NodeIdentity(host="me/worker", port=1, pid=1, version="", model="",
                            model_sha256="", device="", listening="")
    writer = HeartbeatWriter(sessions, identity, 0.1, lambda: True, lambda: "",
                             lambda: renew_leases(sessions, "me/worker:1", 5.0))
    writer.start()
    try:
        assert wait_for(lambda: take_over_expired(audit, "other") == 0 and _lease_left(
            sessions, job) > 2.0, 10, 0.1)
        writer.stopping()  # finishing the running job: still renewed
    finally:
        writer.stop()
    assert take_over_expired(audit, "other") == 0


def _lease_left(sessions, job_id: int) -> float:
    with sessions() as session:
        until = session.get(Job, job_id).lease_until
    return (as_utc(until) - utcnow()).total_seconds() if until else 0.0


def test_notification_messages_are_claimed_by_one_sender_each(
        database_url: str, make_config: Callable[..., NodeConfig]) -> None:
    config = make_config()
    sessions = make_session_factory(make_engine(config.database_url))
    with sessions() as session:
        for n in range(12):
            session.add(Notification(endpoint="hook", event="done", audit_event_id=n,
                                     body="{}"))
        session.commit()
    claimed: list[int] = []

    def drain(name: str) -> None:
        while (note := claim_next(config, sessions, name)) is not None:
            claimed.append(note[0])

    threads = [threading.Thread(target=drain, args=(f"s{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 12


def test_a_late_instance_supersedes_the_running_job_so_a_version_is_done_once(
        database_url: str, tmp_path: Path, make_config: Callable[..., NodeConfig]) -> None:
    """A series judged complete too early is running when its last instances arrive:
    the reopened series gets a new version, the running job (made from fewer instances)
    commits nothing and leaves the series to the new version's job. Before, the series
    was queued again at the same version and both jobs recorded a result."""
    config = make_config(destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}])
    sessions = make_session_factory(make_engine(config.database_url))
    audit = AuditLog(sessions)
    series_id, job_id = _running(audit, "w/worker:1", 60.0)
    with audit.transaction() as session:
        series = session.get(Series, series_id)
        assert series is not None
        reopen(audit, session, series, peer="late")
    with sessions() as session:
        series = session.get(Series, series_id)
        assert series is not None
        assert (series.state, series.version) == (SeriesState.RECEIVING, 2)
    ds = Dataset()
    ds.SOPInstanceUID, ds.SOPClassUID, ds.SeriesInstanceUID = "1.2.3.9.1", "1.2", "1.2.3.9"
    with pytest.raises(Superseded, match="reopened the series as version 2"):
        enqueue_outputs(config, audit, series_id, job_id, 1, [("sc", ds, tmp_path / "x")], None)
    # the job's outcome: abandoned as superseded, the series left as the new version has it
    with sessions() as session:
        session.execute(update(Series).where(Series.id == series_id)
                        .values(state=SeriesState.RUNNING))  # the version 2 job runs
        session.commit()
    finish(cast(NodeContext, SimpleNamespace(audit=audit)), series_id, job_id,
           SeriesState.FAILED, "superseded", time.monotonic())
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.ABANDONED
        assert job.error.startswith("superseded: a late instance reopened")
        assert session.get(Series, series_id).state == SeriesState.RUNNING  # type: ignore[union-attr]
        assert session.scalars(select(OutputInstance.id)).all() == []
        assert verify_chain(session).ok


def test_a_superseded_jobs_expired_lease_leaves_the_new_versions_job_alone(
        database_url: str, make_config: Callable[..., NodeConfig]) -> None:
    """Version 1's worker died after a late instance made version 2, which another worker
    now runs: taking over the expired lease abandons the version 1 job and does not queue
    the series again (that would start a second version 2 job)."""
    config = make_config()
    sessions = make_session_factory(make_engine(config.database_url))
    audit = AuditLog(sessions)
    series_id, old_job = _running(audit, "dead/worker:1", -1.0)  # lease already over
    with audit.transaction() as session:
        series = session.get(Series, series_id)
        assert series is not None
        series.version, series.state = 2, SeriesState.RUNNING
        job = Job(series_id=series_id, series_version=2, state=JobState.RUNNING,
                  owner="live/worker:2", lease_until=utcnow() + timedelta(seconds=60))
        session.add(job)
        session.flush()
        new_job = job.id
    assert take_over_expired(audit, "me/worker:3") == 1
    with sessions() as session:
        assert session.get(Job, old_job).state == JobState.ABANDONED  # type: ignore[union-attr]
        assert session.get(Job, new_job).state == JobState.RUNNING  # type: ignore[union-attr]
        assert session.get(Series, series_id).state == SeriesState.RUNNING  # type: ignore[union-attr]
