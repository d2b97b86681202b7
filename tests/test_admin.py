"""What an admin sees: status, check-config, /healthz and Prometheus metrics; on SQLite
and PostgreSQL (the status and metrics queries run on both)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from sqlalchemy import delete, func, select

from dicom_node.config import NodeConfig, RetentionConfig
from dicom_node.outbox.retention import apply_retention
from dicom_node.service import Node
from storage.models import Instance, OutboxEntry, OutboxState
from tests.conftest import PynetdicomPacs, free_port, pynetdicom_send, wait_for
from tests.dicom_factory import SeriesSpec, write_series


def _config_file(tmp_path: Path, config: NodeConfig, pacs_port: int, dead_port: int) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
data_dir = "{config.data_dir}"
database_url = "{config.database_url}"
[receiver]
port = {config.receiver.port}
min_free_disk_mb = 1.0
[model]
weights_path = "{config.model.weights_path}"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
[[destinations]]
name = "offline"
ae_title = "OFFLINE"
host = "127.0.0.1"
port = {dead_port}
""")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_status_check_config_and_metrics(
        database_url: str, tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    dead_port = free_port()
    metrics_port = free_port()
    config = make_config(
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pynetdicom_pacs.port},
                      {"name": "offline", "ae_title": "OFFLINE", "host": "127.0.0.1",
                       "port": dead_port}],
        metrics={"enabled": True, "port": metrics_port})
    node = start_node(config)
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=41)
    assert pynetdicom_send(files, node.receiver.port) == [0] * 8
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 11, 120)
    path = _config_file(tmp_path, config, pynetdicom_pacs.port, dead_port)

    status = _cli("status", "--config", str(path), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["series"] == {"done": 1}
    assert report["outbox"]["pacs"]["sent"] == 11
    assert wait_for(lambda: json.loads(_cli("status", "--config", str(path), "--json").stdout)
                    ["outbox"]["offline"]["retrying"] == 11, 60)
    assert "send.attempt" in json.loads(
        _cli("status", "--config", str(path), "--json").stdout)["last_error"]["send"]
    assert report["disk_free_mb"] > 0 and report["disk_low"] is False

    check = _cli("check-config", "--config", str(path))
    assert check.returncode == 1  # the offline destination does not answer
    assert (f"receiver.bind_address/receiver.port 127.0.0.1:{config.receiver.port}: in use "
            "by this node") in check.stdout  # the running node is not a failure
    assert f"C-ECHO PACS@127.0.0.1:{pynetdicom_pacs.port}: ok" in check.stdout
    assert f"C-ECHO OFFLINE@127.0.0.1:{dead_port}: FAILED: connection refused" in check.stdout

    base = f"http://127.0.0.1:{metrics_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
        assert response.status == 200 and response.read() == b"ok\n"
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "dicom_node_instances_received_total 8.0" in text
    assert 'dicom_node_series{state="done"} 1.0' in text
    assert 'dicom_node_outbox_entries{destination="pacs",state="sent"} 11.0' in text
    assert "dicom_node_inference_seconds_count 1.0" in text
    assert "dicom_node_send_failures_total" in text
    assert 'dicom_node_jobs_total{outcome="done"} 1.0' in text
    assert f'dicom_node_build_info{{device="cpu",model="test-generator",model_sha256="' \
           f'{node.ctx.predictor.model.sha256}",model_version="' in text
    assert f'version="{version("dicom-node")}"}} 1.0' in text
    # the offline destination's results wait: the oldest has waited a while already
    assert _sample(text, "dicom_node_outbox_oldest_pending_age_seconds") > 0


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_is_degraded_while_results_are_dead_letters(
        database_url: str, tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """A destination that never answers, one attempt allowed: every result becomes a dead
    letter, and /healthz says so (503 with the reason) instead of "ok"."""
    metrics_port = free_port()
    config = make_config(
        destinations=[{"name": "offline", "ae_title": "OFFLINE", "host": "127.0.0.1",
                       "port": free_port()}],
        metrics={"enabled": True, "port": metrics_port}, outbox={"max_attempts": 1})
    node = start_node(config)
    healthz = f"http://127.0.0.1:{metrics_port}/healthz"
    assert _get(healthz) == (200, "ok\n")
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=43)
    assert pynetdicom_send(files, node.receiver.port) == [0] * 8

    def dead_letters() -> int:
        with node.sessions() as session:
            return session.scalar(select(func.count()).select_from(OutboxEntry).where(
                OutboxEntry.state == OutboxState.DEAD)) or 0

    assert wait_for(lambda: dead_letters() == 11, 120), dead_letters()
    status, body = _get(healthz)
    assert status == 503
    assert body.startswith("degraded: 11 dead letter(s)"), body


def test_counters_never_go_down_when_rows_go(
        database_url: str, tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    """The totals are counted from the audit log: retention deleting the files, and rows
    of received instances deleted outright, leave them where they were."""
    metrics_port = free_port()
    config = make_config(
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pynetdicom_pacs.port}],
        metrics={"enabled": True, "port": metrics_port})
    node = start_node(config)
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=44)
    assert pynetdicom_send(files, node.receiver.port) == [0] * 8
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 11, 120)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    before = _get(metrics)[1]
    assert _sample(before, "dicom_node_instances_received_total") == 8
    assert 'dicom_node_jobs_total{outcome="done"} 1.0' in before

    with node.audit.transaction() as session:
        deleted = apply_retention(session, node.audit,
                                  RetentionConfig(incoming_h=1e-9, outputs_h=1e-9))
    assert deleted == (8, 11)
    with node.sessions() as session:
        session.execute(delete(Instance))
        session.commit()
    after = _get(metrics)[1]
    assert _sample(after, "dicom_node_instances_received_total") == 8
    assert 'dicom_node_jobs_total{outcome="done"} 1.0' in after
    assert _sample(after, "dicom_node_outbox_oldest_pending_age_seconds") == 0
