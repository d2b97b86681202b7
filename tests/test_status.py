"""`dicom-node status` tells the truth: running, with the device the node really uses, its
version and uptime, while a real `dicom-node serve` runs; "not running" with exit code 3
once it stopped or was killed; the running job's series and stage; a stage's error only
until the stage succeeds again; and no torch on the way."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from benchmarks._common import port_open
from dicom_node.config import NodeConfig
from dicom_node.ops.heartbeat import HeartbeatWriter, JobStages, NodeIdentity, node_name
from dicom_node.ops.status import (
    EXIT_NOT_RUNNING,
    EXIT_UNHEALTHY,
    delivery_problem,
    node_liveness,
    node_status,
    status_exit_code,
    uncleared_errors,
)
from storage.audit import AuditKind, AuditLog
from storage.database import make_engine, make_session_factory
from storage.models import (
    Job,
    JobState,
    NodeHeartbeat,
    NodeState,
    OutboxEntry,
    OutboxState,
    OutputInstance,
    Series,
    SeriesState,
    utcnow,
)
from tests.conftest import free_port, wait_for

DICOM_NODE = Path(sys.executable).with_name("dicom-node")


def _status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--config",
                           str(config), *args], capture_output=True, text=True, timeout=120,
                          check=False)


def _serve(config: Path, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([str(DICOM_NODE), "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: port_open(port) or proc.poll() is not None, 120), "serve hangs"
    assert proc.poll() is None, proc.communicate()[0]
    return proc


def test_status_follows_a_real_serve_through_start_stop_and_kill(
        tmp_path: Path, test_weights: Path) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f"""
[node]
data_dir = "{tmp_path / 'node'}"
heartbeat_interval_s = 0.5
[receiver]
port = {port}
min_free_disk_mb = 1.0
[model]
weights_path = "{test_weights}"
device = "auto"
""")
    proc = _serve(config, port)
    try:
        running = _status(config, "--json")
        assert running.returncode == 0, running.stdout + running.stderr
        report = json.loads(running.stdout)
        assert report["state"] == "running", report
        # the device the loaded predictor uses ("auto" resolved), not the config's word
        assert report["configured_device"] == "auto"
        assert report["device"] in ("cpu", "cuda", "cuda:0") and report["device"] != "auto"
        assert report["version"] == version("dicom-node")
        assert report["node"]["pid"] == proc.pid
        assert report["node"]["port_listening"] is True
        assert report["uptime_s"] >= 0
        assert report["running_job"] is None
        people = _status(config)
        assert people.returncode == 0, people.stderr
        assert people.stdout.startswith("dicom-node: running")
        assert re.search(rf"device\s+{re.escape(report['device'])}\n", people.stdout), people.stdout
        assert "(port open)" in people.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        stopped = _status(config, "--json")
        assert stopped.returncode == EXIT_NOT_RUNNING, stopped.stdout
        report = json.loads(stopped.stdout)
        assert report["state"] == "not running"
        assert "stopped cleanly" in report["reason"]
        assert report["device"] is None and report["uptime_s"] is None
        people = _status(config)
        assert people.returncode == EXIT_NOT_RUNNING
        assert people.stdout.startswith("dicom-node: NOT RUNNING: stopped cleanly")

        # a crash leaves no clean stop behind: the process is gone all the same
        proc = _serve(config, port)
        assert _status(config).returncode == 0
        proc.kill()
        proc.wait(timeout=60)
        killed = _status(config, "--json")
        assert killed.returncode == EXIT_NOT_RUNNING, killed.stdout
        assert f"process {proc.pid} is gone" in json.loads(killed.stdout)["reason"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_status_imports_no_torch(tmp_path: Path) -> None:
    """The status command stays light: it answers in well under a second because it loads
    neither torch nor the DICOM network stack."""
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "node"}"\n[model]\nweights_path = "w.pt"\n')
    code = ("import sys\nfrom dicom_node.cli import main\n"
            f"code = main(['status', '--config', {str(config)!r}, '--json'])\n"
            "print('EXIT', code, ','.join(m for m in ('torch', 'pynetdicom', 'highdicom') "
            "if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"EXIT {EXIT_NOT_RUNNING}"


def _sessions(config: NodeConfig) -> sessionmaker[Session]:
    return make_session_factory(make_engine(config.database_url))


def _heartbeat(config: NodeConfig, **values: object) -> NodeHeartbeat:
    host = socket.gethostname()
    row = {"node": node_name(host, config.receiver.port), "host": host, "pid": os.getpid(),
           "state": NodeState.RUNNING, "version": "9.9", "model": "m 1", "model_sha256": "ab" * 32,
           "device": "cpu", "listening": "DICOMNODE@127.0.0.1", "healthy": True,
           "job_stage": "", "interval_s": 1.0, "started_at": utcnow(), "beat_at": utcnow()}
    row.update(values)
    return NodeHeartbeat(**row)


def test_a_heartbeat_older_than_three_intervals_means_not_running(
        database_url: str,
        make_config: Callable[..., NodeConfig]) -> None:
    """A node that hangs (its process still there) stops beating: after 3 intervals + 2 s
    status calls it not running."""
    config = make_config()
    sessions = _sessions(config)
    beat = utcnow()
    with sessions() as session:
        session.add(_heartbeat(config, beat_at=beat, interval_s=1.0))
        session.commit()
        fresh = node_liveness(session, config, beat + timedelta(seconds=4.5))
        stale = node_liveness(session, config, beat + timedelta(seconds=5.5))
    assert fresh["state"] == "running"
    assert stale["state"] == "not running"
    assert re.search(r"last heartbeat \d+ s ago \(more than 5 s", stale["reason"]), stale


def test_running_job_series_and_stage_and_a_port_nobody_listens_on(
        database_url: str,
        make_config: Callable[..., NodeConfig]) -> None:
    config = make_config()
    sessions = _sessions(config)
    with sessions() as session:
        series = Series(series_uid="1.2.3.4.5", study_uid="1.2.3", accession_number="ACC7",
                        state=SeriesState.RUNNING, instance_count=40)
        session.add(series)
        session.flush()
        session.add(Job(series_id=series.id, series_version=1, state=JobState.RUNNING,
                        device="cpu", started_at=utcnow() - timedelta(seconds=30)))
        session.add(_heartbeat(config, job_stage="Predictor.predict"))
        session.commit()
    report = node_status(config, sessions)
    job = report["running_job"]
    assert job["series_uid"] == "1.2.3.4.5" and job["accession_number"] == "ACC7"
    assert job["instances"] == 40 and job["stage"] == "Predictor.predict"
    assert job["elapsed_s"] >= 30
    # the heartbeat is fresh, but nothing listens on the node's port: running, unhealthy
    assert report["state"] == "running"
    assert report["reason"] == f"not listening on port {config.receiver.port}"
    assert status_exit_code(report) == EXIT_UNHEALTHY


def test_a_stage_error_is_cleared_once_the_stage_succeeds(
        database_url: str,
        make_config: Callable[..., NodeConfig]) -> None:
    config = make_config()
    sessions = _sessions(config)
    audit = AuditLog(sessions)
    audit.record(AuditKind.SEND_ATTEMPT, outcome="error", reason="connection refused")
    audit.record(AuditKind.JOB_FAIL, outcome="error", reason="VolumeError: gaps")
    audit.record(AuditKind.ASSOC_REJECT, outcome="error", reason="calling AE not allowed")
    with sessions() as session:
        errors = uncleared_errors(session)
    assert "connection refused" in errors["send"]
    assert "VolumeError" in errors["process"]
    assert "calling AE not allowed" in errors["receive"]
    audit.record(AuditKind.SEND_ATTEMPT, outcome="ok")
    audit.record(AuditKind.JOB_FINISH, result="done")
    audit.record(AuditKind.INSTANCE_STORED)
    with sessions() as session:
        assert uncleared_errors(session) == {"receive": "", "process": "", "send": ""}
    audit.record(AuditKind.SEND_ATTEMPT, outcome="error", reason="association aborted")
    with sessions() as session:
        assert "association aborted" in uncleared_errors(session)["send"]


def test_job_stages_name_the_innermost_stage_and_count_sc_slices() -> None:
    stages = JobStages()
    assert stages.current == ""
    with stages("select_series (headers)"):
        assert stages.current == "select_series"
    for _ in range(3):
        with stages("SC: atomic_write (fsync)"):
            pass
    with stages("uncertainty passes (sample_uptake)"):
        assert stages.current == "uncertainty passes; 3 SC slices written"
    with stages("select_series (headers)"):  # the next job starts counting again
        assert stages.current == "select_series"


def test_delivery_problem_names_dead_letters_and_an_old_pending_result(
        database_url: str,
        make_config: Callable[..., NodeConfig]) -> None:
    config = make_config()
    sessions = _sessions(config)
    now = utcnow()
    with sessions() as session:
        series = Series(series_uid="1.2.3.4.6", study_uid="1.2.3")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, series_version=1, state=JobState.DONE)
        session.add(job)
        session.flush()
        outputs = [OutputInstance(sop_uid=f"1.2.3.9.{i}", sop_class_uid="1.2", series_uid="1.2.3.9",
                                  kind="sc", source_series_id=series.id, series_version=1,
                                  job_id=job.id, path="") for i in range(2)]
        session.add_all(outputs)
        session.flush()
        pending = OutboxEntry(output_id=outputs[0].id, destination="pacs", ae_title="PACS",
                              host="127.0.0.1", port=104, state=OutboxState.PENDING, attempts=3,
                              created_at=now - timedelta(seconds=100))
        session.add(pending)
        session.commit()
        assert delivery_problem(session, now, max_pending_age_s=200) == ""
        assert "waited 100 s for delivery" in delivery_problem(session, now, max_pending_age_s=50)
        session.add(OutboxEntry(output_id=outputs[1].id, destination="pacs", ae_title="PACS",
                                host="127.0.0.1", port=104, state=OutboxState.DEAD))
        session.commit()
        assert "1 dead letter(s)" in delivery_problem(session, now, max_pending_age_s=200)


def test_heartbeat_writer_says_running_stopping_then_stopped(
        database_url: str,
        make_config: Callable[..., NodeConfig]) -> None:
    """The writer's own rows: a beat per interval with the health and job stage it is
    given, "stopping" as soon as SIGTERM's stop begins (status: still there, exit 0),
    "stopped" at the end (status: not running)."""
    config = make_config(node={"heartbeat_interval_s": 0.1})
    sessions = _sessions(config)
    healthy = [True]
    identity = NodeIdentity(host=socket.gethostname(), port=config.receiver.port,
                            pid=os.getpid(), version="1.2", model="m 1", model_sha256="cd" * 32,
                            device="cpu", listening="DICOMNODE@127.0.0.1")
    writer = HeartbeatWriter(sessions, identity, config.heartbeat_interval_s,
                             lambda: healthy[0], lambda: "Predictor.predict")

    def row() -> NodeHeartbeat:
        with sessions() as session:
            found = session.get(NodeHeartbeat, node_name(identity.host, identity.port))
            assert found is not None
            return found

    writer.start()
    try:
        first = row().beat_at
        assert wait_for(lambda: row().beat_at > first and row().job_stage == "Predictor.predict",
                        30)
        healthy[0] = False
        assert wait_for(lambda: not row().healthy, 30)
        with sessions() as session:
            unhealthy = node_liveness(session, config, utcnow())
        assert unhealthy["reason"].startswith("unhealthy")
        writer.stopping()
        assert row().state == NodeState.STOPPING
        with sessions() as session:
            stopping = node_liveness(session, config, utcnow())
        assert stopping["state"] == "stopping"
        assert status_exit_code({**stopping}) == 0
    finally:
        writer.stop()
    assert row().state == NodeState.STOPPED
    with sessions() as session:
        assert node_liveness(session, config, utcnow())["state"] == "not running"
