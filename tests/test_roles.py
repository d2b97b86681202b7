"""Roles: a receiver, a worker and a sender as three ``dicom-node serve --role``
processes on one PostgreSQL and one store, and the config's ``[node] role``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from benchmarks._common import free_port, port_open
from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from storage.audit import AuditKind, verify_chain
from storage.database import make_engine, make_session_factory
from storage.models import AuditEvent, NodeHeartbeat, OutboxEntry, OutboxState
from tests.conftest import PynetdicomPacs, storescu, subprocess_node_toml, wait_for
from tests.dicom_factory import SeriesSpec, write_series


def test_role_is_checked_in_the_config(tmp_path: Path) -> None:
    model = {"weights_path": "w.pt"}
    assert parse_config({"model": model}, tmp_path).role == "all"
    assert parse_config({"node": {"role": "worker"}, "model": model}, tmp_path).role == "worker"
    with pytest.raises(ConfigError, match=r"node\.role must be one of"):
        parse_config({"node": {"role": "gpu"}, "model": model}, tmp_path)


def with_database(toml: str, url: str) -> str:
    return toml.replace("[node]\n", f'[node]\ndatabase_url = "{url}"\n', 1)


@pytest.mark.postgres
def test_receiver_worker_and_sender_processes_share_the_work(
        tmp_path: Path, test_weights: Path, postgres_url: str,
        pynetdicom_pacs: PynetdicomPacs) -> None:
    """The receiver stores and records, the worker (which listens on nothing) completes
    and processes, the sender delivers; each runs only its part, each beats its heartbeat
    row, and the audit chain the three appended to verifies."""
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(with_database(subprocess_node_toml(
        tmp_path / "node", port, test_weights, "STORESCU", pynetdicom_pacs.ae_title,
        pynetdicom_pacs.port), postgres_url))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {role: subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--role", role, "--config",
         str(config)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for role in ("receiver", "worker", "sender")}
    try:
        assert wait_for(lambda: port_open(port), 60, 0.5)
        files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=10), seed=31)
        result = storescu(files, port)
        assert result.returncode == 0, result.stderr
        # 10 SC + SEG + SR + KOS (and the image SR when a lesion is found)
        assert wait_for(lambda: len(pynetdicom_pacs.received.files()) >= 13, 180, 0.5)
        engine = make_engine(postgres_url)
        sessions = make_session_factory(engine)
        with sessions() as session:
            assert wait_for(lambda: session.scalar(select(OutboxEntry.id).where(
                OutboxEntry.state != OutboxState.SENT)) is None, 60, 0.5)
            beats = {b.node.split(":")[0].rsplit("/", 1)[-1]: b
                     for b in session.scalars(select(NodeHeartbeat))}
            assert set(beats) == {"receiver", "worker", "sender"}
            assert beats["worker"].listening == "" and beats["sender"].model == ""
            assert beats["worker"].model != ""
            beats_nodes = [b.node for b in beats.values()]
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=60)
    assert all(p.returncode == 0 for p in procs.values()), \
        {r: p.stderr.read() for r, p in procs.items() if p.stderr}
    # every C-STORE the PACS answered (its files are keyed by SOP UID: a repeat overwrites)
    sops = Counter(str(ds.SOPInstanceUID) for ds in pynetdicom_pacs.received.datasets)
    assert set(sops.values()) == {1}
    with sessions() as session:
        check = verify_chain(session)
        assert check.ok, check.reason
        starts = [e.detail for e in session.scalars(select(AuditEvent).where(
            AuditEvent.kind == AuditKind.NODE_START))]
        for role in ("receiver", "worker", "sender"):
            assert sum(f'"role": "{role}"' in detail for detail in starts) == 1, role
        # every event names the process that wrote it: its heartbeat name
        by_kind = session.execute(select(AuditEvent.kind, AuditEvent.node)).all()
        assert {node for _kind, node in by_kind} == set(beats_nodes)
        roles = {kind: {node.split(":")[0].rsplit("/", 1)[-1] for k, node in by_kind
                        if k == kind} for kind in ("instance.stored", "job.start",
                                                   "send.attempt")}
        assert roles == {"instance.stored": {"receiver"}, "job.start": {"worker"},
                         "send.attempt": {"sender"}}
    engine.dispose()
