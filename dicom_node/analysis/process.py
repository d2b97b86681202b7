"""TBR analysis in a process of its own, so the job writes and sends meanwhile.

``measure_tbr`` (numpy and scipy; about 1.9 s for 176 x 256x256 on 2 CPU cores) holds
the GIL for part of its run. In the node's own process it would slow down what the job
does while it waits for the ratios: encoding and writing the SC series and the sender
streaming it to PACS. So the node starts ``python -m dicom_node.analysis.process``
once, keeps it warm, and sends it one request per series: the uptake, the T1C and the
settings go to the child's stdin as a pickle, the :class:`~dicom_node.analysis.tbr.TbrResult`
comes back on its stdout. The child imports numpy, scipy and :mod:`dicom_node.analysis.tbr`
only (no torch), and exits when its stdin closes, also when the node is killed.

A child that dies (killed, out of memory) fails that one request with
:class:`AnalysisProcessError` and is started again for the next; so does one that runs
past ``analysis.timeout_s`` (the job stops it with :meth:`AnalysisProcess.abort`). An exception inside
the analysis comes back as :class:`AnalysisError` with its type and message; the job
records either reason in the audit log.

``analysis.separate_process = false`` runs the analysis in the job's thread instead
(:class:`InlineAnalysis`): one process and about 320 MB less, no overlap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Protocol

import numpy as np
from numpy.typing import NDArray

from dicom_node.analysis.tbr import InThread, TbrResult, measure_tbr

log = logging.getLogger(__name__)

_PROTOCOL = 5
_READY = b"ready\n"  # the child's first bytes: imported, signals set
_CLOSE_TIMEOUT_S = 30.0
_START_TIMEOUT_S = 60.0


class AnalysisError(RuntimeError):
    """The analysis raised; the message carries the exception's type and text."""


class AnalysisProcessError(RuntimeError):
    """The analysis process ended or answered something unreadable."""


@dataclass(frozen=True)
class TbrRequest:
    """The arguments of one :func:`~dicom_node.analysis.tbr.measure_tbr` call."""

    uptake: NDArray[np.float32]
    voxel_volume_ml: float
    threshold: float
    min_lesion_volume_ml: float
    display_threshold: float
    spacing_mm: tuple[float, float, float]
    t1c_grey: NDArray[np.float32] | None
    columns_toward_patient_left: bool
    threads: int = 1

    def run(self) -> TbrResult:
        return measure_tbr(self.uptake, self.voxel_volume_ml, self.threshold,
                           self.min_lesion_volume_ml, self.display_threshold,
                           spacing_mm=self.spacing_mm, t1c_grey=self.t1c_grey,
                           columns_toward_patient_left=self.columns_toward_patient_left,
                           threads=self.threads)


class Analysis(Protocol):
    """Where a job's TBR analysis runs."""

    def submit(self, request: TbrRequest) -> Future[TbrResult]: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


def _run_inline(request: TbrRequest) -> TbrResult:
    try:
        return request.run()
    except Exception as exc:  # handed to the job through the future, which records it
        raise AnalysisError(f"{type(exc).__name__}: {exc}") from exc


class InlineAnalysis:
    """The analysis in the caller's thread, done by the time ``submit`` returns."""

    def submit(self, request: TbrRequest) -> Future[TbrResult]:
        return InThread().submit(_run_inline, request)

    def abort(self) -> None:
        pass  # nothing runs after submit returns

    def close(self) -> None:
        pass


class AnalysisProcess:
    """The warm child process, one request at a time (requests queue in order)."""

    def __init__(self, start_timeout_s: float = _START_TIMEOUT_S) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="analysis")
        self._start_timeout_s = start_timeout_s

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the child now and wait until it is ready (about 0.5 s of imports), so
        a broken installation stops the node at start-up, not at its first series."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:
            self._discard(self._proc)  # died between requests: close its pipes
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # main only
        try:
            proc = subprocess.Popen([sys.executable, "-m", "dicom_node.analysis.process"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except OSError as exc:
            raise AnalysisProcessError(f"cannot start the analysis process: {exc}") from exc
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], self._start_timeout_s)
        if not ready or proc.stdout.read(len(_READY)) != _READY:  # imports failed: stderr
            self._discard(proc)
            raise AnalysisProcessError(
                f"analysis process {proc.pid} did not start within "
                f"{self._start_timeout_s:g} s (exit code {proc.returncode})")
        self._proc = proc
        log.info("started analysis process %d", proc.pid)
        return proc

    def submit(self, request: TbrRequest) -> Future[TbrResult]:
        return self._calls.submit(self._call, request)

    def _call(self, request: TbrRequest) -> TbrResult:
        with self._lock:
            proc = self._ensure_started()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                pickle.dump(request, proc.stdin, protocol=_PROTOCOL)
                proc.stdin.flush()
                ok, value = pickle.load(proc.stdout)
            except BaseException as exc:  # the pipe is out of step now: never reuse it
                self._discard(proc)
                if not isinstance(exc, Exception):
                    raise
                raise AnalysisProcessError(
                    f"analysis process {proc.pid} ended (exit code {proc.returncode}): "
                    f"{type(exc).__name__}: {exc}") from exc
        if not ok:
            raise AnalysisError(str(value))
        if not isinstance(value, TbrResult):
            raise AnalysisProcessError(f"analysis process answered a {type(value).__name__}")
        return value

    def abort(self) -> None:
        """Kill the child (its request ran past the job's limit): that request fails with
        :class:`AnalysisProcessError` and the next one starts a new child."""
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()

    def _discard(self, proc: subprocess.Popen[bytes]) -> None:
        """Forget a child that failed; the next request starts a new one."""
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self._proc is proc:
            self._proc = None

    def close(self) -> None:
        """End the child: EOF on its stdin, after which it exits (a request it is
        running is answered first); killed if it has not ended within 30 s."""
        self._calls.shutdown(wait=False, cancel_futures=True)
        proc = self._proc
        if proc is not None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
            try:
                proc.wait(timeout=_CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._calls.shutdown(wait=True)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        self._proc = None


def serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """The child's loop: one reply per request, until the node closes the pipe."""
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        try:
            reply: tuple[bool, object] = (True, request.run())
        except Exception as exc:  # request boundary: the job gets the reason and audits it
            reply = (False, f"{type(exc).__name__}: {exc}")
        try:
            pickle.dump(reply, replies, protocol=_PROTOCOL)
            replies.flush()
        except BrokenPipeError:
            return  # the node is gone


def main() -> None:
    # SIGTERM and Ctrl-C reach the node's whole process group; the node lets its running
    # job finish and then closes the pipe, which is when this process ends.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Replies own the real stdout; anything printed goes to stderr (the node's journal).
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    replies.write(_READY)
    replies.flush()
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
