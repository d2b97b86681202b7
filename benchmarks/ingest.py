"""Ingest: DCMTK storescu -> {DCMTK storescp, bare pynetdicom SCP, our node}.

Instances/s and MB/s (storescu wall clock, process start to exit), median of --runs,
for a 300 x 256x256 and a 60 x 512x512 MR series, with 1 and 4 concurrent storescu
senders (the files split among them). Ratios to DCMTK storescp and to the bare
pynetdicom raw-write SCP measured in the same run. Receivers are interleaved run by
run so background load hits them alike. Below the table: where the node's C-STORE
handler spends its time (measured by wrapping its calls in this process).

    .venv/bin/python -m benchmarks.ingest [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import (
    Storescp,
    command_line,
    fmt,
    free_port,
    machine_line,
    median,
    node_raw_config,
    port_open,
    storescu_popen,
    storescu_timed,
    table,
    wait_for,
    write_mr_series,
)


class BareScp:
    """pynetdicom SCP: TCP_NODELAY on accepted sockets, ``encoded_dataset()`` to disk."""

    def __init__(self, folder: Path, fsync: bool = False) -> None:
        self.folder = folder
        self.fsync = fsync
        self.port = free_port()
        self._server: Any = None

    def _on_open(self, event: Any) -> None:
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_store(self, event: Any) -> int:
        data = event.encoded_dataset()
        path = self.folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        if self.fsync:
            from storage.file_store import atomic_write
            atomic_write(path, data)
        else:
            with open(path, "wb") as handle:
                handle.write(data)
        return 0x0000

    def start(self) -> BareScp:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="BARESCP")
        ae.maximum_associations = 16
        ae.add_supported_context(MRImageStorage)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class HandlerTimes:
    """Wraps the node receiver's calls to see where a C-STORE's time goes."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.total[label] += time.perf_counter() - start
                    self.count[label] += 1

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def install(self) -> None:
        import dicom_node.ingest.instance_recorder as recorder
        import dicom_node.ingest.receiver as receiver

        self._wrap(receiver.Receiver, "handle_store", "handle_store (all)")
        self._wrap(receiver, "read_instance_header", "header read")
        self._wrap(receiver, "atomic_write", "atomic_write (fsync+rename)")
        self._wrap(receiver, "atomic_move", "atomic_move (fsync+rename)")
        self._wrap(recorder.InstanceRecorder, "record",
                   "recorder batch (SQLite+audit, off the handler's path)")
        self._wrap(receiver.Receiver, "_disk_is_low", "_disk_is_low")

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def summary(self) -> str:
        parts = []
        for label in self.total:
            n = max(1, self.count[label])
            parts.append(f"{label} {1000 * self.total[label] / n:.2f} ms x {self.count[label]}")
        return "; ".join(parts)


def run_dcmtk(files: list[Path], work: Path, senders: int) -> float:
    scp = Storescp(work / "dcmtk").start()
    try:
        return storescu_timed(files, scp.port, scp.ae_title, senders)
    finally:
        scp.stop()


def run_bare(files: list[Path], work: Path, senders: int, fsync: bool) -> float:
    scp = BareScp(work / "bare", fsync=fsync).start()
    try:
        wait_for(lambda: port_open(scp.port), 10)
        return storescu_timed(files, scp.port, "BARESCP", senders)
    finally:
        scp.stop()


def run_node(files: list[Path], work: Path, senders: int) -> float:
    from dicom_node.config import parse_config
    from dicom_node.service import Node

    port = free_port()
    config = parse_config(node_raw_config(work / "node", port), work)
    node = Node(config)
    node.start()
    try:
        wait_for(lambda: port_open(port), 10)
        return storescu_timed(files, port, "DICOMNODE", senders)
    finally:
        node.stop()


TWO_PROCESSES = "dicom-node serve + receive (2 processes)"


def _toml(raw: dict[str, Any]) -> str:
    """The few TOML shapes a node config uses: tables of scalars and string lists, and
    arrays of tables."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []
    for name, section in raw.items():
        if isinstance(section, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {value(v)}" for k, v in section.items()]
        else:
            for table_ in section:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {value(v)}" for k, v in table_.items()]
    return "\n".join(lines) + "\n"


def run_node_two_processes(files: list[Path], work: Path, senders: int) -> float:
    """``dicom-node serve`` (in this process) plus ``dicom-node receive`` (a second
    process, same database and store) on its own port; the senders alternate ports."""
    from dicom_node.config import parse_config
    from dicom_node.service import Node

    port, second = free_port(), free_port()
    raw = node_raw_config(work / "node", port)
    config_path = work / "node.toml"
    config_path.write_text(_toml(raw))
    node = Node(parse_config(raw, work))
    node.start()
    log_path = work / "receive.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "receive", "--port",
                             str(second), "--config", str(config_path)],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        # Wait for its "listening" line: probing the port would leave half-open
        # associations that count against max_associations until their ARTIM timeout.
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"dicom-node receive did not start: {line!r}; its log ends: "
                               f"{log_path.read_text(errors='replace')[-600:]}")
        wait_for(lambda: port_open(port), 10)
        chunks = [list(files[i::senders]) for i in range(senders)]
        started = time.perf_counter()
        procs = [storescu_popen(chunk, (port, second)[i % 2], "DICOMNODE", "STORESCU", ())
                 for i, chunk in enumerate(chunks) if chunk]
        for sender in procs:
            _, err = sender.communicate(timeout=600)
            if sender.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-300:]}")
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per cell (median)")
    parser.add_argument("--quick", action="store_true", help="1 run, smaller series")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    runs = 1 if args.quick else max(1, args.runs)
    datasets = [("300 x 256x256", 300, 256), ("60 x 512x512", 60, 512)]
    if args.quick:
        datasets = [("100 x 256x256", 100, 256), ("20 x 512x512", 20, 512)]
    receivers: list[tuple[str, Callable[[list[Path], Path, int], float]]] = [
        ("DCMTK storescp", run_dcmtk),
        ("bare pynetdicom (write)", lambda f, w, s: run_bare(f, w, s, fsync=False)),
        ("bare pynetdicom (fsync+rename)", lambda f, w, s: run_bare(f, w, s, fsync=True)),
        ("dicom-node Receiver", run_node),
        (TWO_PROCESSES, run_node_two_processes),
    ]
    times: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    sizes: dict[str, tuple[int, int]] = {}
    handler = HandlerTimes()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        series: dict[str, list[Path]] = {}
        for seed, (label, n, size) in enumerate(datasets):
            files = write_mr_series(root / f"src{seed}", n, size, size, seed=seed + 100)
            series[label] = files
            sizes[label] = (len(files), sum(os.path.getsize(p) for p in files))
        for _run in range(runs):
            for label, files in series.items():
                for senders in (1, 4):
                    for name, fn in receivers:
                        if name == TWO_PROCESSES and senders == 1:
                            continue  # one sender reaches one port, i.e. one process
                        work = Path(tempfile.mkdtemp(prefix="r-", dir=root))
                        measure = name == "dicom-node Receiver" and senders == 1 and \
                            label == datasets[0][0]
                        if measure:
                            handler.install()
                        try:
                            times[(label, senders, name)].append(fn(files, work, senders))
                        finally:
                            if measure:
                                handler.uninstall()
                        import shutil
                        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for label, _, _ in datasets:
        count, nbytes = sizes[label]
        for senders in (1, 4):
            ref_dcmtk = median(times[(label, senders, "DCMTK storescp")])
            ref_bare = median(times[(label, senders, "bare pynetdicom (write)")])
            for name, _ in receivers:
                if not times[(label, senders, name)]:
                    continue
                t = median(times[(label, senders, name)])
                rows.append([label, senders, name, fmt(count / t, 0),
                             fmt(nbytes / t / 1e6, 1), fmt(ref_dcmtk / t, 3),
                             fmt(ref_bare / t, 2), fmt(t, 2)])
    print(f"Ingest over loopback, storescu (TCP_NODELAY=1) wall clock, median of {runs} "
          f"run(s); {machine_line()}")
    print(table(["series", "senders", "receiver", "inst/s", "MB/s", "x DCMTK",
                 "x bare pynetdicom", "median s"], rows))
    print(f"node C-STORE handler, mean per instance ({datasets[0][0]}, 1 sender): "
          f"{handler.summary()}")
    print(f"reproduce: {command_line()}")


if __name__ == "__main__":
    main()
