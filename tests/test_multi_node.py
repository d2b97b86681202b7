"""Several nodes as real processes on one PostgreSQL and one store: two receivers (the
senders spread over them), two workers, one sender. A worker is SIGKILLed in the middle
of a job: its lease expires, the other worker takes the series over with the same output
UIDs, every series is done exactly once, every result reaches the PACS once, and
``dicom-node audit --verify`` passes over what all the processes appended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from benchmarks._common import free_port, port_open
from storage.database import make_engine, make_session_factory
from storage.models import Job, JobState, OutboxEntry, OutboxState, Series, SeriesState
from tests.conftest import PynetdicomPacs, storescu, subprocess_node_toml, wait_for
from tests.dicom_factory import SeriesSpec, write_series

SERIES = 4
SLICES = 12


def _config(tmp_path: Path, name: str, port: int, weights: Path, url: str,
            pacs: PynetdicomPacs) -> Path:
    toml = subprocess_node_toml(tmp_path / "shared", port, weights, "STORESCU", pacs.ae_title,
                                pacs.port)
    toml = toml.replace("[node]\n", f'[node]\ndatabase_url = "{url}"\nlease_s = 3.0\n'
                        "heartbeat_interval_s = 0.5\n", 1)
    toml = toml.replace("[outbox]\n", "[outbox]\nlease_s = 10.0\n", 1)
    path = tmp_path / f"{name}.toml"
    path.write_text(toml)
    return path


@pytest.mark.postgres
def test_a_killed_worker_is_taken_over_and_every_series_is_done_and_sent_once(
        tmp_path: Path, test_weights: Path, postgres_url: str,
        pynetdicom_pacs: PynetdicomPacs) -> None:
    ports = {name: free_port() for name in ("r1", "r2", "w1", "w2", "s")}
    roles = {"r1": "receiver", "r2": "receiver", "w1": "worker", "w2": "worker", "s": "sender"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, role in roles.items():
        config = _config(tmp_path, name, ports[name], test_weights, postgres_url, pynetdicom_pacs)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--role", role, "--config",
             str(config)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    victim = ""
    try:
        assert wait_for(lambda: port_open(ports["r1"]) and port_open(ports["r2"]), 60, 0.5)
        series = [write_series(tmp_path / f"s{i}", SeriesSpec(n_slices=SLICES,
                                                              patient_id=f"P{i}"), seed=40 + i)
                  for i in range(SERIES)]
        results: list[subprocess.CompletedProcess[str]] = []
        senders = [threading.Thread(target=lambda f, p: results.append(storescu(f, p)),
                                    args=(files, ports["r1" if i % 2 == 0 else "r2"]))
                   for i, files in enumerate(series)]
        for thread in senders:
            thread.start()
        by_port = {f":{ports[w]}": w for w in ("w1", "w2")}

        def running_owner() -> str:
            with sessions() as session:
                owner = session.scalar(select(Job.owner).where(Job.state == JobState.RUNNING)
                                       .limit(1))
            return next((w for tail, w in by_port.items() if owner and owner.endswith(tail)),
                        "")

        assert wait_for(lambda: bool(running_owner()), 120, 0.05), "no job ever ran"
        victim = running_owner()
        procs[victim].send_signal(signal.SIGKILL)  # mid-job: no stop, no outcome
        procs[victim].wait(timeout=30)
        for thread in senders:
            thread.join()
        assert [r.returncode for r in results] == [0] * SERIES, [r.stderr for r in results]

        def finished() -> bool:
            with sessions() as session:
                done = session.scalar(select(func.count()).select_from(Series).where(
                    Series.state == SeriesState.DONE))
                unsent = session.scalar(select(func.count()).select_from(OutboxEntry).where(
                    OutboxEntry.state != OutboxState.SENT))
            return done == SERIES and unsent == 0

        assert wait_for(finished, 240, 0.5), "not every series was done and sent"
    finally:
        for name, proc in procs.items():
            if name != victim:
                proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=60)
    assert all(p.returncode == 0 for n, p in procs.items() if n != victim), \
        {n: p.stderr.read() for n, p in procs.items() if p.stderr and n != victim}
    with sessions() as session:
        jobs = session.execute(select(Job.series_id, Job.state, Job.owner, Job.error)).all()
        outbox = session.scalar(select(func.count()).select_from(OutboxEntry))
    done = Counter(series_id for series_id, state, _o, _e in jobs if state == JobState.DONE)
    assert sorted(done.values()) == [1] * SERIES  # every series done exactly once
    taken = [error for _s, state, owner, error in jobs if state == JobState.ABANDONED]
    assert len(taken) == 1 and f":{ports[victim]} expired; taken over by" in taken[0]
    # every C-STORE the PACS answered (its files are keyed by SOP UID: a repeat overwrites)
    sops = Counter(str(ds.SOPInstanceUID) for ds in pynetdicom_pacs.received.datasets)
    assert set(sops.values()) == {1} and len(sops) == outbox  # every result once
    verify = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "audit", "--verify", "--config",
         str(tmp_path / "s.toml")], capture_output=True, text=True, env=env, timeout=120,
        check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    engine.dispose()
