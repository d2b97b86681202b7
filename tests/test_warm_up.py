"""The writers' warm-up at node start (dicom_node/writers/warm_up.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.service import Node
from dicom_node.writers.provenance import Provenance
from dicom_node.writers.warm_up import warm_up_outputs
from storage.audit import AuditKind
from storage.models import AuditEvent
from tests.conftest import validate_dicom

SC = "1.2.840.10008.5.1.4.1.1.7"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
PROVENANCE = Provenance("dicom-node", "fdopa-demo", "2.1.1", "0" * 64)


def test_warm_up_builds_valid_outputs_of_each_kind(tmp_path: Path) -> None:
    """The warm-up goes through the real writers: an SC from the series template, the
    summary slice, a SEG, both SRs (volumetric, image-anchored) and the KOS; each is a valid
    object (written here only to be validated; the node never writes them)."""
    outputs = warm_up_outputs(PROVENANCE)
    for k, (ds, data) in enumerate(outputs):
        path = tmp_path / f"{k}.dcm"
        path.write_bytes(data)
        assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert [str(ds.SOPClassUID) for ds, _ in outputs] == [SC, SC, SEG, COMPREHENSIVE_3D_SR,
                                                           COMPREHENSIVE_3D_SR, KOS]
    result = validate_dicom(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_warm_up_fills_highdicoms_tables_and_writes_nothing(tmp_path: Path) -> None:
    """In a fresh interpreter (as the node starts, logging at INFO), the warm-up loads
    highdicom's tables of the standard, which the first series would otherwise wait for,
    leaves no file, and keeps highdicom's notes about its synthetic source out of the log."""
    script = (
        "import json, logging\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from highdicom import _standard_utils as standard\n"
        "from dicom_node.writers.provenance import Provenance\n"
        "from dicom_node.writers.warm_up import warm_up_writers\n"
        "before = standard.get_module_attribute_map.cache_info().currsize\n"
        "seconds = warm_up_writers(Provenance('m', 'n', 'v', '0' * 64))\n"
        "after = standard.get_module_attribute_map.cache_info().currsize\n"
        "print(json.dumps([before, after, seconds]))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=True,
                            env={**os.environ,
                                 "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    before, after, seconds = json.loads(result.stdout)
    assert (before, after) == (0, 1)
    assert seconds > 0
    assert list(tmp_path.iterdir()) == []
    assert "highdicom" not in result.stderr, result.stderr[:500]


def test_a_failed_warm_up_is_audited_and_the_node_starts_anyway(
        make_config: Callable[..., NodeConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up only saves the first series some set-up. If the model's warm-up batch
    fails (CUDA out of memory at the full batch size, which a series survives by halving
    its batch), the node still starts, listens, and says so in its start event."""
    from dicom_node.inference.predictor import Predictor

    def out_of_memory(self: Predictor) -> float:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Predictor, "warm_up", out_of_memory)
    config = make_config(analysis={"separate_process": False})
    node = Node(config)
    node.start()
    try:
        assert node.healthy()
        with node.sessions() as session:
            start = session.scalars(select(AuditEvent).where(
                AuditEvent.kind == AuditKind.NODE_START)).one()
        assert start.outcome == "warning"
        detail = json.loads(start.detail)
        assert "CUDA out of memory" in detail["warm_up_error"]
        assert "model_warm_up_s" not in detail and detail["writers_warm_up_s"] > 0
    finally:
        node.stop()


def test_usable_cpus_honours_a_cgroup_quota(tmp_path: Path) -> None:
    """analysis.threads = 0 counts the CPUs a container may use, not the host's."""
    from dicom_node.config import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("100000 100000\n")  # one CPU
    assert usable_cpus(limit) == 1
    limit.write_text("max 100000\n")
    assert usable_cpus(limit) == affinity
    assert usable_cpus(tmp_path / "missing") == affinity
