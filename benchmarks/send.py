"""Send: our outbox Sender vs DCMTK storescu vs pynetdicom's default SCU, same storescp.

The files are real node outputs: a T1C series run through the node's own code path
(SC per slice + SEG + SR), recorded in the outbox with ``outbox.enqueue.enqueue_outputs``.
Every sender sends the same files to the same DCMTK storescp (TCP_NODELAY=1), one
association, in the same run; senders are interleaved run by run; median of --runs.

    .venv/bin/python -m benchmarks.send [--slices 300] [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import (
    Storescp,
    command_line,
    fmt,
    machine_line,
    median,
    storescu_timed,
    table,
    write_mr_series,
)
from benchmarks._pipeline import Timer, make_context, output_paths, reset_outbox, run_series_timed


def pynetdicom_send(files: list[Path], port: int, *, nodelay: bool, from_path: bool,
                    chunked: bool = False) -> float:
    """pynetdicom SCU, one association; ``from_path`` passes the file path (pynetdicom
    then decodes and re-encodes it), ``chunked`` also sets pynetdicom's
    STORE_SEND_CHUNKED_DATASET (the file's bytes are streamed undecoded)."""
    from pynetdicom import _config

    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = chunked
    try:
        return _pynetdicom_send(files, port, nodelay=nodelay, from_path=from_path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def _pynetdicom_send(files: list[Path], port: int, *, nodelay: bool, from_path: bool) -> float:
    from pydicom import dcmread
    from pynetdicom import AE

    from dicom_node.net.ae import set_nodelay

    started = time.perf_counter()
    ae = AE(ae_title="BENCHSCU")
    classes = sorted({str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
                          .SOPClassUID) for p in files})
    for sop_class in classes:
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    assert assoc.is_established
    if nodelay:
        set_nodelay(assoc)
    failed = 0
    for path in files:
        if not assoc.is_established:
            raise RuntimeError("association aborted mid-send")
        rsp = assoc.send_c_store(path if from_path else dcmread(path))
        if int(rsp.get("Status", -1)) != 0:
            failed += 1
    assoc.release()
    elapsed = time.perf_counter() - started
    if failed:
        raise RuntimeError(f"{failed} C-STORE failed")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="SC instances (+ SEG + SR)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="60 slices, 1 run")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    slices = 60 if args.quick else args.slices
    runs = 1 if args.quick else max(1, args.runs)
    times: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, list[str]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-send-") as tmp:
        root = Path(tmp)
        scp = Storescp(root / "storescp").start()
        try:
            ctx = make_context(root / "node", destinations=[
                {"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1",
                 "port": scp.port}])
            from dicom_node.outbox.sender import Sender

            sender = Sender(ctx.config, ctx.sessions, ctx.audit)
            source = write_mr_series(root / "src", slices, 256, 256, seed=7)
            run_series_timed(ctx, source, Timer(), fine=False)
            files = output_paths(ctx)
            nbytes = sum(os.path.getsize(p) for p in files)

            def node_sender() -> float:
                reset_outbox(ctx)
                started = time.perf_counter()
                stored = sender.send_due()
                elapsed = time.perf_counter() - started
                if stored != len(files):
                    raise RuntimeError(f"Sender stored {stored} of {len(files)}")
                return elapsed

            senders: list[tuple[str, Callable[[], float]]] = [
                ("DCMTK storescu -R (TCP_NODELAY=1)",
                 lambda: storescu_timed(files, scp.port, scp.ae_title, extra=["-R"])),
                ("dicom-node Sender.send_due", node_sender),
                ("pynetdicom default SCU (dcmread, Nagle on)",
                 lambda: pynetdicom_send(files, scp.port, nodelay=False, from_path=False)),
                ("pynetdicom + TCP_NODELAY, dcmread+re-encode",
                 lambda: pynetdicom_send(files, scp.port, nodelay=True, from_path=False)),
                ("pynetdicom + TCP_NODELAY, send file path",
                 lambda: pynetdicom_send(files, scp.port, nodelay=True, from_path=True)),
                ("pynetdicom + TCP_NODELAY, file streamed (chunked)",
                 lambda: pynetdicom_send(files, scp.port, nodelay=True, from_path=True,
                                         chunked=True)),
            ]
            for _ in range(runs):
                for name, fn in senders:
                    shutil.rmtree(scp.folder, ignore_errors=True)
                    scp.folder.mkdir()
                    try:
                        times[name].append(fn())
                    except (RuntimeError, AssertionError) as exc:  # an aborted association
                        failures[name].append(f"{type(exc).__name__}: {exc}"[:120])
            received = scp.count()
            ctx.engine.dispose()
        finally:
            scp.stop()
    t_dcmtk = median(times[senders[0][0]])
    t_default = median(times[senders[2][0]])
    rows: list[list[Any]] = []
    for name, _ in senders:
        t = median(times[name])
        rows.append([name, fmt(len(files) / t, 0), fmt(nbytes / t / 1e6, 1),
                     fmt(t_dcmtk / t, 3), fmt(t_default / t, 2), fmt(t, 2),
                     len(failures[name])])
    print(f"Send {len(files)} node outputs ({slices} SC + SEG + SR, {nbytes / 1e6:.1f} MB) to "
          f"DCMTK storescp over loopback, one association, median of {runs} run(s); "
          f"{machine_line()}; storescp got {received} files in the last run")
    print(table(["sender", "inst/s", "MB/s", "x DCMTK storescu", "x pynetdicom default",
                 "median s", "failed runs"], rows))
    for name, errors in [(n, e) for n, e in failures.items() if e]:
        print(f"failed run(s) of {name}: {'; '.join(errors)}")
    print(f"reproduce: {command_line()}")


if __name__ == "__main__":
    main()
