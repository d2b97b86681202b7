"""A node told to stop stops: a job that wakes another while the scheduler shuts down,
and a peer gone silent in the middle of a PDU, once kept ``dicom-node serve`` alive for
ever after SIGTERM (systemd then kills it at TimeoutStopSec)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.schedulers.base import STATE_STOPPED
from pynetdicom import evt
from sqlalchemy import select

from benchmarks._common import free_port
from dicom_node.config import NodeConfig
from dicom_node.scheduler import JobsInFlight, _guarded, _scheduler, _waker, stop_scheduler
from dicom_node.service import Node
from storage.audit import AuditKind, AuditLog
from storage.database import make_engine, make_session_factory
from storage.models import AuditEvent, OutboxEntry, OutboxState, Series
from tests.conftest import (
    PynetdicomPacs,
    pynetdicom_send,
    storescu,
    subprocess_node_toml,
    wait_for,
    written_outputs,
)
from tests.dicom_factory import SeriesSpec, write_series

REPO = Path(__file__).resolve().parents[1]
#: 10 of the 205 bytes an A-ASSOCIATE-RQ announces: the peer then goes silent.
HALF_ASSOCIATE_RQ = b"\x01\x00\x00\x00\x00\xcd\x00\x01\x00\x00"


def test_a_job_that_needs_the_scheduler_does_not_hold_the_stop(tmp_path: Path) -> None:
    """A job still running when the stop begins, which then asks the scheduler for a job
    (as a finished series wakes the send job), ends and the stop returns; a wake-up
    after the stop starts nothing."""
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    audit = AuditLog(make_session_factory(engine))
    scheduler = _scheduler()
    in_flight = JobsInFlight()
    started, asked = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        assert wait_for(lambda: scheduler.state == STATE_STOPPED, 60, 0.01)
        scheduler.get_job("other")  # takes the scheduler's job-store lock
        asked.set()

    # Interval jobs, as the node's are (a one-shot job is removed by the scheduler's own
    # loop after it ran, which races with the shut-down job store).
    scheduler.add_job(_guarded(audit, "job", job, in_flight), "interval", seconds=3600,
                      id="job", next_run_time=datetime.now(UTC))
    scheduler.add_job(lambda: None, "interval", seconds=3600, id="other")
    scheduler.start()
    assert started.wait(60)
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(
        stop_scheduler(scheduler, in_flight, 60.0)), daemon=True)
    stopper.start()
    stopper.join(90)
    assert not stopper.is_alive(), "the stop waited on a job that waited on the scheduler"
    assert stopped == [True] and asked.is_set() and in_flight.running == 0
    asked_after: list[str] = []
    scheduler.get_job = asked_after.append
    _waker(scheduler)("other")  # stopped: the scheduler (and its locks) is not touched
    assert asked_after == []
    engine.dispose()


def test_a_job_still_queued_when_the_stop_begins_never_starts(tmp_path: Path) -> None:
    """Closed, the count lets no job start: one queued behind another for its thread
    (the send loop's second instance) would otherwise run after the node tore down."""
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    in_flight = JobsInFlight()
    ran: list[str] = []
    first = _guarded(AuditLog(make_session_factory(engine)), "first",
                     lambda: ran.append("first"), in_flight)
    first()
    in_flight.close()
    first()
    assert ran == ["first"] and in_flight.running == 0
    engine.dispose()


def test_jobs_in_flight_reports_a_job_that_outlives_the_wait() -> None:
    in_flight = JobsInFlight()
    assert in_flight.wait_idle(0.0)
    in_flight.enter()
    assert not in_flight.wait_idle(0.01) and in_flight.running == 1
    in_flight.leave()
    assert in_flight.wait_idle(0.0)


def _events(db: Path, kind: str) -> list[AuditEvent]:
    engine = make_engine(f"sqlite:///{db}")
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind)))
    finally:
        engine.dispose()


def _series_states(db: Path) -> list[str]:
    engine = make_engine(f"sqlite:///{db}")
    try:
        with make_session_factory(engine)() as session:
            return [str(s) for s in session.scalars(select(Series.state))]
    finally:
        engine.dispose()


def _serve(config: Path, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)], cwd=REPO,
        stdout=log.open("a"), stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_sigterm_during_a_job_with_a_peer_silent_mid_pdu(tmp_path: Path,
                                                         test_weights: Path) -> None:
    """``dicom-node serve`` gets SIGTERM while it processes a series and while a peer
    that sent 10 bytes of an A-ASSOCIATE-RQ says nothing more: it exits on its own,
    records its stop, and the series is finished after the next start (nothing lost)."""
    port = free_port()
    data = tmp_path / "node"
    config = tmp_path / "node.toml"
    config.write_text(subprocess_node_toml(data, port, test_weights, "STORESCU", "PACS",
                                           free_port()))
    db = data / "dicom-node.db"
    log = tmp_path / "node.log"
    files = write_series(tmp_path / "in", SeriesSpec(n_slices=96, rows=256, columns=256,
                                                     slice_spacing_mm=1.0), seed=1)
    proc = _serve(config, log)
    silent: socket.socket | None = None
    try:
        assert wait_for(lambda: "listening as" in log.read_text(), 180), log.read_text()
        storescu(files, port)
        assert wait_for(lambda: "running" in _series_states(db)
                        or "done" in _series_states(db), 300), _series_states(db)
        opened = len(_events(db, AuditKind.ASSOC_OPEN))
        silent = socket.create_connection(("127.0.0.1", port))
        silent.sendall(HALF_ASSOCIATE_RQ)
        assert wait_for(lambda: len(_events(db, AuditKind.ASSOC_OPEN)) > opened, 60)
        proc.send_signal(signal.SIGTERM)
        # The receiver's grace (10 s), the job's end and the analysis process: well
        # within systemd's TimeoutStopSec (120 s), which is the bound here.
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if silent is not None:
            silent.close()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert _events(db, AuditKind.NODE_STOP), "the stop was not recorded"

    assert ("aborted 1 association(s) still open: 127.0.0.1 (no association requested yet)\n"
            in log.read_text())
    restarted = _serve(config, log)
    try:
        assert wait_for(lambda: log.read_text().count("dicom-node listening as") == 2, 180)
        assert wait_for(lambda: _series_states(db) == ["done"], 300), _series_states(db)
    finally:
        restarted.send_signal(signal.SIGTERM)
        try:
            restarted.wait(timeout=120)
        except subprocess.TimeoutExpired:
            restarted.kill()
            restarted.wait()
    assert restarted.returncode == 0


class _StopAtFirstStore(PynetdicomPacs):
    """A PACS during whose first C-STORE the node is told to stop."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.on_first: Callable[[], None] = lambda: None

    def _on_store(self, event: evt.Event) -> int:
        if not self.received.datasets:
            self.on_first()
        return super()._on_store(event)


def test_a_stopping_sender_ends_its_batch_and_leaves_the_rest_due(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """Told to stop during a batch, the sender sends nothing more from it: the rest is
    released (due again, no attempt counted), and sent once the sender goes on."""
    pacs = _StopAtFirstStore(tmp_path / "pacs")
    pacs.start()
    node = start_node(make_config(
        destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                       "port": pacs.port}],
        outbox={"associations_per_destination": 1}))
    # The sender's own stop signal (in the node it is the node's): held until the series
    # is done, so that its first pass claims every output in one batch.
    held = threading.Event()
    held.set()
    node.sender.stopping = held
    pacs.on_first = held.set
    try:
        files = write_series(tmp_path / "mr", SeriesSpec(n_slices=16, rows=64, columns=64),
                             seed=5)
        pynetdicom_send(files, node.receiver.port)

        def series_done() -> bool:
            with node.sessions() as session:
                return [str(s) for s in session.scalars(select(Series.state))] == ["done"]

        def entries() -> list[OutboxEntry]:
            with node.sessions() as session:
                return list(session.scalars(select(OutboxEntry)))

        assert wait_for(series_done, 300)
        with node.sessions() as session:
            written = written_outputs(session)
        assert len(entries()) == written > 2
        assert not pacs.received.datasets
        held.clear()

        def released() -> list[OutboxEntry]:
            return [e for e in entries() if e.claimed_by == node.node_id
                    and e.state == OutboxState.PENDING and e.lease_until is None]

        assert wait_for(lambda: len(released()) == written - 1, 120)
        assert len(pacs.received.datasets) == 1
        assert all(e.attempts == 0 for e in released()), "a stop counted as an attempt"

        held.clear()  # the sender goes on: everything arrives, once
        assert wait_for(lambda: len(pacs.received.datasets) == written, 120)
        assert len({ds.SOPInstanceUID for ds in pacs.received.datasets}) == written
    finally:
        pacs.stop()
