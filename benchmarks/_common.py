"""Shared helpers for the benchmarks: ports, DCMTK processes, series, tables.

Everything runs over loopback, on free ports, in temporary folders that are removed.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEMO_WEIGHTS = REPO / "dicom_node" / "models" / "demo-generator.pt"
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


def command_line() -> str:
    """The exact command that reproduces this run."""
    module = Path(sys.argv[0]).stem
    return f".venv/bin/python -m benchmarks.{module} " + " ".join(sys.argv[1:])


def machine_line() -> str:
    try:
        load = os.getloadavg()
        load_text = f"load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    except OSError:
        load_text = ""
    return f"{os.cpu_count()} CPU cores visible, {load_text}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SystemExit(f"{tool} not found on PATH: install DCMTK ('make install')")
    return path


class Storescp:
    """DCMTK storescp (TCP_NODELAY=1) writing every instance to ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "STORESCP") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Storescp:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [require("storescp"), "--aetitle", self.ae_title, "--output-directory",
             str(self.folder), "--accept-all", "-uf", str(self.port)], env=NODELAY_ENV,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for(lambda: port_open(self.port), 10):
            self.stop()
            raise RuntimeError("storescp did not start")
        return self

    def count(self) -> int:
        return sum(1 for _ in self.folder.iterdir())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def storescu_popen(files: Sequence[Path], port: int, called_ae: str,
                   calling_ae: str = "STORESCU",
                   extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen([require("storescu"), "-aet", calling_ae, "-aec", called_ae,
                             *extra, "127.0.0.1", str(port), *map(str, files)],
                            env=NODELAY_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def storescu_timed(files: Sequence[Path], port: int, called_ae: str, senders: int = 1,
                   calling_ae: str = "STORESCU", extra: Sequence[str] = ()) -> float:
    """Wall clock of ``senders`` concurrent storescu processes (files split among them)."""
    chunks = [list(files[i::senders]) for i in range(senders)]
    started = time.perf_counter()
    procs = [storescu_popen(chunk, port, called_ae, calling_ae, extra) for chunk in chunks if chunk]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"storescu failed: {errors[0]}")
    return elapsed


def write_mr_series(out_dir: Path, n_slices: int, rows: int, columns: int,
                    seed: int = 0, description: str = "T1 MPRAGE +C ax") -> list[Path]:
    from tests.dicom_factory import SeriesSpec, write_series

    spacing = 240.0 / max(rows, columns)
    return write_series(out_dir, SeriesSpec(n_slices=n_slices, rows=rows, columns=columns,
                                            description=description,
                                            pixel_spacing_mm=spacing, slice_spacing_mm=1.0),
                        seed=seed)


def node_raw_config(data_dir: Path, port: int, **sections: dict[str, Any]) -> dict[str, Any]:
    """A node configuration (as the TOML dict) for a benchmark node on loopback."""
    raw: dict[str, Any] = {
        "node": {"data_dir": str(data_dir)},
        "receiver": {"ae_title": "DICOMNODE", "bind_address": "127.0.0.1", "port": port,
                     "min_free_disk_mb": 1.0, "max_associations": 16},
        "series": {"stable_after_s": 3600.0, "complete_grace_s": 0.0, "sweep_interval_s": 1.0},
        "selection": {"min_slices": 16},
        "model": {"weights_path": str(DEMO_WEIGHTS), "device": "cpu", "batch_size": 16},
        "peers": [{"ae_title": "STORESCU", "addresses": ["127.0.0.1"]}],
        "destinations": [],
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return raw


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    text_rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h)
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in text_rows]
    return "\n".join([line, sep, *body])


def fmt(value: float, digits: int = 1) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:.{digits}f}"
