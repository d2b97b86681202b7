"""The TBR analysis process and the send loop that overlap a job's analysis with
writing and sending its fusion series (docs/performance.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

import dicom_node.analysis.process as analysis_module
from dicom_node.analysis.process import (
    AnalysisError,
    AnalysisProcess,
    AnalysisProcessError,
    InlineAnalysis,
    TbrRequest,
)
from dicom_node.analysis.tbr import TbrResult, measure_tbr
from dicom_node.config import NodeConfig
from dicom_node.inference.fusion import window_t1c
from dicom_node.scheduler import SendLoop
from dicom_node.service import Node
from storage.models import AuditEvent, OutboxEntry, OutputInstance, Series
from tests.conftest import PynetdicomPacs, pynetdicom_send, wait_for
from tests.dicom_factory import SeriesSpec, write_series
from training.phantom import PhantomGeometry, generate_patient

GEOMETRY = PhantomGeometry(rows=128, cols=128, pixel_spacing_mm=2.0, slice_spacing_mm=4.0)


@pytest.fixture(scope="module")
def request_with_lesions() -> TbrRequest:
    patient = generate_patient(5, seed=0, geometry=GEOMETRY)  # two tumours
    return TbrRequest(patient.uptake.astype(np.float32),
                      float(np.prod(GEOMETRY.spacing_mm)) / 1000.0, 1.6, 0.1, 0.3,
                      spacing_mm=GEOMETRY.spacing_mm, t1c_grey=window_t1c(patient.t1c),
                      columns_toward_patient_left=True, threads=3)


@pytest.fixture
def analysis() -> Iterator[AnalysisProcess]:
    process = AnalysisProcess()
    process.start()
    yield process
    process.close()


def assert_same(a: TbrResult, b: TbrResult) -> None:
    assert a.background_mean == b.background_mean and a.finding == b.finding
    assert np.array_equal(a.background_mask, b.background_mask)
    assert [(x.tbr_max, x.tbr_mean, x.volume_ml, x.side, x.per_slice) for x in a.lesions] == \
        [(x.tbr_max, x.tbr_mean, x.volume_ml, x.side, x.per_slice) for x in b.lesions]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.lesions, b.lesions, strict=True))


def test_the_process_measures_exactly_what_the_node_would_measure_itself(
        analysis: AnalysisProcess, request_with_lesions: TbrRequest) -> None:
    """The request asks for 3 threads; the reference here runs in one."""
    here = measure_tbr(request_with_lesions.uptake, request_with_lesions.voxel_volume_ml, 1.6,
                       0.1, 0.3, spacing_mm=request_with_lesions.spacing_mm,
                       t1c_grey=request_with_lesions.t1c_grey, columns_toward_patient_left=True)
    assert here.lesions, "the phantom must give lesions, or the comparison proves little"
    there = analysis.submit(request_with_lesions).result(timeout=120)
    assert_same(there, here)
    assert_same(InlineAnalysis().submit(request_with_lesions).result(), here)


def test_an_error_in_the_analysis_comes_back_and_the_process_goes_on(
        analysis: AnalysisProcess, request_with_lesions: TbrRequest) -> None:
    flat = np.zeros((4, 8), np.float32)  # 2D: not a volume
    bad = TbrRequest(flat, 0.1, 1.6, 0.1, 0.3, (4.0, 2.5, 2.5), None, True)
    with pytest.raises(AnalysisError, match=r"^\w+(Error|Exception): "):
        analysis.submit(bad).result(timeout=120)
    pid = analysis.pid
    assert analysis.submit(request_with_lesions).result(timeout=120).lesions
    assert analysis.pid == pid  # the same warm process


def test_a_killed_process_fails_one_request_and_the_next_gets_a_new_one(
        analysis: AnalysisProcess, request_with_lesions: TbrRequest) -> None:
    pid = analysis.pid
    assert pid is not None
    # killed while a request is under way: that request fails with the reason
    started = threading.Event()
    original = analysis._ensure_started

    def kill_then_continue() -> subprocess.Popen[bytes]:
        proc = original()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        started.set()
        return proc

    analysis._ensure_started = kill_then_continue  # type: ignore[method-assign]
    with pytest.raises(AnalysisProcessError, match=f"analysis process {pid} ended"):
        analysis.submit(request_with_lesions).result(timeout=120)
    assert started.is_set()
    analysis._ensure_started = original  # type: ignore[method-assign]
    assert analysis.submit(request_with_lesions).result(timeout=120).lesions
    assert analysis.pid not in (None, pid)


def test_close_ends_the_process_and_it_ignores_sigterm_meanwhile(
        request_with_lesions: TbrRequest) -> None:
    process = AnalysisProcess()
    process.start()
    pid = process.pid
    assert pid is not None
    # systemd sends SIGTERM to the whole service; the node finishes its job first
    os.kill(pid, signal.SIGTERM)
    assert process.submit(request_with_lesions).result(timeout=120).lesions
    assert process.pid == pid
    process.close()
    assert process.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_process_that_cannot_start_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")  # starts, never gets ready
    with pytest.raises(AnalysisProcessError, match=r"did not start within 60 s \(exit code 1\)"):
        AnalysisProcess().start()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(AnalysisProcessError, match="cannot start the analysis process"):
        AnalysisProcess().start()


def test_the_analysis_process_does_not_import_torch() -> None:
    code = ("import sys, dicom_node.analysis.process\n"
            "print(sorted(m for m in ('torch', 'pydicom', 'highdicom') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "[]"


def test_a_wake_up_during_a_send_pass_runs_another_pass() -> None:
    release = threading.Event()
    in_pass = threading.Event()
    passes: list[int] = []
    woken_job: list[int] = []

    def send() -> None:
        passes.append(1)
        in_pass.set()
        if len(passes) == 1:
            assert release.wait(30)

    loop = SendLoop(send, lambda: woken_job.append(1))
    loop.wake()  # idle: the scheduler job is woken
    assert woken_job == [1]
    worker = threading.Thread(target=loop.run)
    worker.start()
    assert in_pass.wait(30)
    loop.wake()  # arrives while the first pass sends
    assert woken_job == [1]  # not handed to the scheduler, which would skip it
    release.set()
    worker.join(30)
    assert passes == [1, 1]  # the pass went round once more
    loop.wake()  # idle again
    assert woken_job == [1, 1]


def _series_state(node: Node, series_uid: str) -> str:
    with node.sessions() as session:
        row = session.scalars(select(Series).where(Series.series_uid == series_uid)).first()
        return row.state if row else ""


def _nothing_of_the_job_left(node: Node) -> None:
    """A failed job queued nothing and left no output file: the PACS can never get part
    of its set."""
    with node.sessions() as session:
        assert session.scalars(select(OutboxEntry)).all() == []
        assert session.scalars(select(OutputInstance)).all() == []
    outputs = node.config.store_dir / "outputs"
    assert not outputs.exists() or [p for p in outputs.rglob("*") if p.is_file()] == []


def test_a_failed_analysis_sends_nothing_and_fails_the_job(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs,
        monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_node(make_config(analysis={"separate_process": False}, destinations=[{
        "name": "pacs", "ae_title": pynetdicom_pacs.ae_title, "host": "127.0.0.1",
        "port": pynetdicom_pacs.port}]))
    assert node.analysis is None and isinstance(node.ctx.analysis, InlineAnalysis)

    def broken(*args: object, **kwargs: object) -> TbrResult:
        raise MemoryError("cannot allocate the brain mask")

    monkeypatch.setattr(analysis_module, "measure_tbr", broken)
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=31)
    assert pynetdicom_send(files, node.receiver.port) == [0] * 8
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert wait_for(lambda: _series_state(node, series_uid) == "failed", 120)
    _nothing_of_the_job_left(node)
    assert pynetdicom_pacs.received.files() == []
    with node.sessions() as session:
        reasons = [e.detail for e in session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "job.fail", AuditEvent.series_uid == series_uid)).all()]
    assert any("MemoryError: cannot allocate the brain mask" in r for r in reasons)


def test_the_node_runs_its_analysis_in_a_child_and_ends_it_on_stop(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    node = start_node(make_config(destinations=[{
        "name": "pacs", "ae_title": pynetdicom_pacs.ae_title, "host": "127.0.0.1",
        "port": pynetdicom_pacs.port}]))
    assert node.analysis is not None
    pid = node.analysis.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # died between jobs: the next job starts a new one
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=32)
    assert pynetdicom_send(files, node.receiver.port) == [0] * 8
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 11, 120)
    assert wait_for(lambda: _series_state(node, series_uid) == "done", 60)
    new_pid = node.analysis.pid
    assert new_pid not in (None, pid)
    node.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(new_pid, 0)


def test_an_analysis_past_its_time_limit_is_stopped_and_the_job_fails(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    node = start_node(make_config(analysis={"timeout_s": 0.001}, destinations=[{
        "name": "pacs", "ae_title": pynetdicom_pacs.ae_title, "host": "127.0.0.1",
        "port": pynetdicom_pacs.port}]))
    assert node.analysis is not None
    pid = node.analysis.pid
    assert pid is not None
    # A stopped child never answers: the analysis of this small series would otherwise
    # finish while the job writes the SC slices, before the job asks for the result.
    os.kill(pid, signal.SIGSTOP)
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=33)
    assert pynetdicom_send(files, node.receiver.port) == [0] * 8
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert wait_for(lambda: _series_state(node, series_uid) == "failed", 120)
    with node.sessions() as session:
        reasons = [e.detail for e in session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "job.fail", AuditEvent.series_uid == series_uid)).all()]
    assert any("longer than analysis.timeout_s (0.001 s) and was stopped" in r for r in reasons)
    _nothing_of_the_job_left(node)
    assert pynetdicom_pacs.received.files() == []
    assert wait_for(lambda: node.analysis is not None and node.analysis.pid != pid, 30)
