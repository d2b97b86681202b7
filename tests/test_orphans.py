"""A receiver that dies between confirming a C-STORE and committing its row leaves a
rowless file in ``incoming/``: on a shared database another running receiver records it
once it is older than ``receiver.orphan_grace_s``, and leaves newer ones alone (they may be
a live receiver's, a moment before its row)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from benchmarks._common import free_port, port_open
from storage.database import make_engine, make_session_factory
from storage.file_store import FileStore
from storage.models import Instance
from tests.conftest import subprocess_node_toml, wait_for
from tests.dicom_factory import SeriesSpec, write_series
from tests.test_roles import with_database


def _leave_in_incoming(store: FileStore, source: Path, age_s: float) -> Path:
    """Put ``source`` where a receiver stores it, last changed ``age_s`` ago."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    path = store.incoming_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                               str(ds.SOPInstanceUID))
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


@pytest.mark.postgres
def test_a_running_receiver_records_what_a_dead_receiver_confirmed(
        tmp_path: Path, test_weights: Path, postgres_url: str) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    toml = with_database(subprocess_node_toml(tmp_path / "node", port, test_weights,
                                              "STORESCU", "PACS", free_port()), postgres_url)
    toml = toml.replace("[receiver]\n", "[receiver]\norphan_grace_s = 120.0\n"
                        "orphan_sweep_interval_s = 0.5\n", 1)
    config.write_text(toml)
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=3), seed=5)
    store = FileStore(tmp_path / "node" / "store")
    # a live receiver's file, its row a moment away: never taken by another receiver
    fresh = _leave_in_incoming(store, files[0], age_s=0.0)
    # ...and a temporary file being written now, never removed
    part = fresh.parent / ".tmp-live.part"
    part.write_bytes(b"partial")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--role",
                             "receiver", "--config", str(config)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)

    def recorded() -> set[str]:
        with sessions() as session:
            return set(session.scalars(select(Instance.path)))
    try:
        assert wait_for(lambda: port_open(port), 60, 0.5)
        # After the start: a dead receiver's confirmed instances, an hour old, and its
        # abandoned temporary file. The periodic sweep takes them.
        dead = [_leave_in_incoming(store, f, age_s=3600.0) for f in files[1:]]
        stale = dead[0].parent / ".tmp-dead.part"
        stale.write_bytes(b"partial")
        then = time.time() - 3600.0
        os.utime(stale, (then, then))
        assert wait_for(lambda: {str(p) for p in dead} <= recorded(), 60, 0.5), recorded()
        assert wait_for(lambda: not stale.exists(), 30, 0.5)
        assert str(fresh) not in recorded()
        assert part.exists()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        engine.dispose()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
