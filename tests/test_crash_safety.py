"""SIGKILL the node mid-receive, mid-inference and mid-send; after a restart every
series is processed exactly once, every result reaches the destination, and the store
holds no partial file.

The three kills run on SQLite and on PostgreSQL (``database_url``). On SQLite the
database file itself is cut mid-write by the kill (its journal recovers it at the next
open); on PostgreSQL the server lives on and only the node's open transactions are
rolled back: that leg checks the node's own recovery (the abandoned job, the released
send claims, the unrecorded files) against the other engine."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dicom_node.net.ae import keep_responses
from storage.database import make_engine
from storage.models import Job, OutboxEntry, Series
from tests.conftest import free_port, subprocess_node_toml, wait_for, written_outputs
from tests.dicom_factory import SeriesSpec, write_series

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage


class SlowPacs:
    """A receiving SCP that counts every SOP Instance UID it is sent (duplicates too)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.port = free_port()
        self.delay_s = delay_s
        self.seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for sop in (SecondaryCaptureImageStorage, ComprehensiveSRStorage, SegmentationStorage,
                    COMPREHENSIVE_3D_SR, KOS):
            ae.add_supported_context(sop)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        time.sleep(self.delay_s)
        with self._lock:
            self.seen[str(event.request.AffectedSOPInstanceUID)] += 1  # type: ignore[union-attr]
        return 0x0000

    def unique(self) -> int:
        with self._lock:
            return len(self.seen)

    def stop(self) -> None:
        self._server.shutdown()  # type: ignore[union-attr]


class NodeProcess:
    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve",
                                      "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import socket

        def listening() -> bool:
            with socket.socket() as sock:
                sock.settimeout(0.2)
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        assert wait_for(listening, 120, 0.1), "node did not start"
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then wait for the node to finish its orderly stop (the job in hand,
        the outbox flush): on a loaded CI machine that can take minutes, so the wait is
        for the exit, bounded only against a hung process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the node did not stop within 15 min of SIGTERM") from None


@dataclass(frozen=True)
class Setup:
    config: Path  # the node's TOML
    port: int
    pacs: SlowPacs
    data: Path  # data_dir: the store (and the SQLite database)
    url: str  # the database


@pytest.fixture
def setup(request: pytest.FixtureRequest, tmp_path: Path, test_weights: Path) -> Iterator[Setup]:
    """A node's config and its receiving PACS; the node uses ``database_url`` when the
    test takes it, else the SQLite file in its data_dir."""
    pacs = SlowPacs(delay_s=0.05)
    port = free_port()
    data = tmp_path / "node"
    config = tmp_path / "node.toml"
    toml = subprocess_node_toml(data, port, test_weights, "TESTSCU", "PACS", pacs.port)
    url = f"sqlite:///{data / 'dicom-node.db'}"
    if "database_url" in request.fixturenames:
        url = str(request.getfixturevalue("database_url"))
        toml = toml.replace("[node]\n", f'[node]\ndatabase_url = "{url}"\n', 1)
    config.write_text(toml)
    yield Setup(config, port, pacs, data, url)
    pacs.stop()
    engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()


def _send(files: list[Path], port: int, stop_after: int | None = None) -> int:
    """Send with a pynetdicom SCU; returns how many were acknowledged."""
    ae = AE(ae_title="TESTSCU")
    # A busy machine (eight senders, the node's jobs, CI's other work on 2 cores) may
    # answer slowly: wait for the answer, not for pynetdicom's 30 s defaults.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return 0
    # pynetdicom's reactor sometimes takes a C-STORE response meant for the waiting request
    # ("Received unexpected C-STORE service message"), which then waits out the DIMSE
    # timeout: the node's own sender keeps such responses (net.ae), and so does this SCU.
    keep_responses(assoc)
    done = 0
    for index, path in enumerate(files):
        if stop_after is not None and index == stop_after:
            break
        status = assoc.send_c_store(dcmread(path))
        if "Status" not in status or int(status.Status) != 0:
            break
        done += 1
    if assoc.is_established:
        assoc.release()
    return done


_engines: dict[str, Engine] = {}


def _db(url: str) -> Session:
    """A session on the node's database (one engine per database and test)."""
    if url not in _engines:
        _engines[url] = make_engine(url)
    return Session(_engines[url])


def _series_state(url: str) -> str | None:
    with _db(url) as session:
        return session.scalars(select(Series.state)).first()


def _check_exactly_once(setup: Setup, n_slices: int) -> None:
    data, pacs = setup.data, setup.pacs

    def expected() -> int:  # SC per slice, SEG, SR, KOS (+ the image SR with a lesion)
        with _db(setup.url) as session:
            return max(n_slices + 3, written_outputs(session))

    assert wait_for(lambda: pacs.unique() == expected(), 180), pacs.unique()

    def all_sent() -> bool:
        # the PACS counts an instance before it answers, and the node commits the
        # outcome after the answer (group commit, OUTCOME_LINGER_S): give it that moment
        with _db(setup.url) as session:
            return set(session.scalars(select(OutboxEntry.state))) == {"sent"}

    wait_for(all_sent, 30)
    with _db(setup.url) as session:
        jobs = session.scalars(select(Job)).all()
        entries = session.scalars(select(OutboxEntry)).all()
        series = session.scalars(select(Series)).all()
    assert len(series) == 1 and series[0].state == "done"
    assert [j.state for j in jobs].count("done") == 1  # processed exactly once
    assert all(j.state in ("done", "abandoned") for j in jobs)
    assert len(entries) == expected() and {e.state for e in entries} == {"sent"}
    # the destination saw each result at least once; a second copy is only ever a
    # re-send of the UID in flight at the kill or of one whose outcome was still waiting
    # for its group commit (OUTCOME_LINGER_S, 50 ms: one more at this PACS's 10/s)
    assert sum(count - 1 for count in pacs.seen.values()) <= 2
    store = data / "store"
    assert not list(store.rglob(".tmp-*"))
    for path in store.rglob("*.dcm"):
        dcmread(path)  # every stored file is whole


def test_kill_mid_receive(database_url: str, tmp_path: Path, setup: Setup) -> None:
    config, port = setup.config, setup.port
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=12), seed=31)
    node = NodeProcess(config, port).start()
    try:
        assert _send(files, port, stop_after=5) == 5
        node.kill()  # half a series received
        node.start()
        assert _send(files, port) == 12  # the sender retries the whole series
        _check_exactly_once(setup, 12)
    finally:
        node.stop()


def test_kill_during_inference(database_url: str, tmp_path: Path, setup: Setup) -> None:
    config, port = setup.config, setup.port
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=40, rows=256, columns=256),
                         seed=32)
    node = NodeProcess(config, port).start()
    try:
        assert _send(files, port) == 40
        assert wait_for(lambda: _series_state(setup.url) == "running", 60, 0.02)
        node.kill()
        with _db(setup.url) as session:
            assert session.scalars(select(Series.state)).first() == "running"
        node.start()
        _check_exactly_once(setup, 40)
        with _db(setup.url) as session:
            assert [j.state for j in session.scalars(select(Job)).all()] == ["abandoned", "done"]
    finally:
        node.stop()


def test_kill_mid_send(database_url: str, tmp_path: Path, setup: Setup) -> None:
    config, port, pacs = setup.config, setup.port, setup.pacs
    pacs.delay_s = 0.1
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=30), seed=33)
    node = NodeProcess(config, port).start()
    try:
        assert _send(files, port) == 30
        assert wait_for(lambda: pacs.unique() >= 5, 120, 0.02)
        node.kill()
        assert pacs.unique() < 32
        node.start()
        _check_exactly_once(setup, 30)
    finally:
        node.stop()


def test_sigterm_exits_cleanly(setup: Setup) -> None:
    node = NodeProcess(setup.config, setup.port).start()
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=600) == 0


def test_atomic_move_across_filesystems_copies_atomically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where rename cannot cross filesystems (EXDEV), atomic_move copies through
    atomic_writer: the whole file or, if the copy fails, nothing and no partial file."""
    import errno
    import os
    import shutil

    from storage import file_store

    source = tmp_path / "a" / "source.dcm"
    source.parent.mkdir()
    source.write_bytes(b"x" * 3_000_000)
    real_replace = os.replace

    def cross_device(src: str | Path, dst: str | Path) -> None:
        if Path(src) == source:
            raise OSError(errno.EXDEV, "cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(file_store.os, "replace", cross_device)
    target = tmp_path / "b" / "target.dcm"
    file_store.atomic_move(source, target)
    assert target.read_bytes() == source.read_bytes()

    def broken_copy(*args: object) -> None:
        raise OSError(errno.EIO, "copy failed")

    monkeypatch.setattr(shutil, "copyfileobj", broken_copy)
    other = tmp_path / "b" / "other.dcm"
    with pytest.raises(OSError, match="copy failed"):
        file_store.atomic_move(source, other)
    assert not other.exists() and not list(other.parent.glob(".tmp-*.part"))
