"""End to end: storescu -> `dicom-node serve` (subprocess) -> DCMTK storescp.

A 176 x 256x256 T1C series is sent with DCMTK storescu (TCP_NODELAY=1) to a node
started as ``dicom-node serve --config <generated toml>`` (demo model, device auto,
default series timing: geometric completion after ``complete_grace_s``), whose one
destination is DCMTK storescp. Clock starts when storescu exits (the last instance
acknowledged by the node) and stops when storescp has written every result
(176 SC + SEG + SR). The quiet/grace period is read from the node's audit table
(the series' ``ready`` event) and reported separately, as are the job time (jobs
table) and the last outbox ``sent_at``; the first result file shows how soon the
fusion series starts to arrive (its slices go out while the TBR analysis runs). Peak
RSS is the node's VmHWM, and its analysis process's beside it. ``--inline-analysis``
runs the TBR in the job's thread instead (``analysis.separate_process = false``);
``--analysis-threads N`` sets ``analysis.threads`` (default 0: CPUs - 1, at most 4);
``--uncertainty-samples N`` sets ``analysis.uncertainty_samples`` (default 4).

    .venv/bin/python -m benchmarks.end_to_end [--runs 2] [--slices 176] [--quick]
        [--inline-analysis] [--analysis-threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DEMO_WEIGHTS,
    REPO,
    Storescp,
    command_line,
    fmt,
    free_port,
    machine_line,
    median,
    port_open,
    storescu_timed,
    table,
    wait_for,
    write_mr_series,
)
from dicom_node.cli import stop_child_node
from dicom_node.config import AnalysisConfig

TOML = """\
[node]
data_dir = "{data_dir}"

[receiver]
ae_title = "DICOMNODE"
bind_address = "127.0.0.1"
port = {port}
min_free_disk_mb = 1.0

[series]
stable_after_s = {stable}
complete_grace_s = {grace}
sweep_interval_s = {sweep}

[analysis]
separate_process = {separate}
threads = {threads}
uncertainty_samples = {samples}

[model]
weights_path = "{weights}"
device = "{device}"
batch_size = 16

[outbox]
send_interval_s = {send_interval}

[[peers]]
ae_title = "STORESCU"
addresses = ["127.0.0.1"]

[[destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {pacs_port}
"""


def parse_ts(text: str) -> float:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_pids(pid: int) -> set[int]:
    """The processes a process started (its analysis process), from every thread."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            found.update(int(child) for child in (task / "children").read_text().split())
    return found


def queued_outputs(database: Path) -> int:
    """How many outputs the node has queued for its one destination (0 if unreadable)."""
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def phantom_brain_series(out_dir: Path, slices: int) -> list[Path]:
    """The T1C of the demo's phantom patient (seed 0, patient 1000: chosen long before any
    model, never for one) at 256 x 256, 1 mm pixels and ``slices`` 1 mm slices."""
    from training.phantom import PhantomGeometry, generate_patient
    from training.phantom_dicom import write_patient

    patient = generate_patient(1000, 0, PhantomGeometry(slice_spacing_mm=1.0, n_slices=slices))
    return list(write_patient(patient, out_dir).t1c)


def one_run(root: Path, source: list[Path], args: argparse.Namespace) -> dict[str, float]:
    scp = Storescp(root / "storescp").start()
    port = free_port()
    data_dir = root / "node"
    config = root / "node.toml"
    config.write_text(TOML.format(data_dir=data_dir, port=port, stable=args.stable_after,
                                  grace=args.grace, sweep=args.sweep,
                                  weights=getattr(args, "weights", None) or DEMO_WEIGHTS,
                                  device=args.device, send_interval=args.send_interval,
                                  pacs_port=scp.port,
                                  separate="false" if args.inline_analysis else "true",
                                  threads=getattr(args, "analysis_threads", 0),
                                  samples=getattr(args, "uncertainty_samples", 4)))
    log = (root / "node.log").open("wb")
    node = subprocess.Popen([str(REPO / ".venv" / "bin" / "dicom-node"), "serve", "--config",
                             str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    expected = len(source) + 2
    try:
        if not wait_for(lambda: port_open(port), 120, 0.1):
            raise RuntimeError(f"node did not start: {(root / 'node.log').read_text()[-2000:]}")
        storescu_timed(source, port, "DICOMNODE")
        acked = time.time()
        first: list[float] = []

        def all_stored() -> bool:
            count = scp.count()
            if count and not first:
                first.append(time.time())
            if count < expected:
                return False
            # N + 3 at least (SC per slice, SEG, SR, KOS); N + 4 when a lesion was found (the
            # image-anchored SR): the whole set is queued at once, so the outbox holds it
            return count >= max(expected, queued_outputs(data_dir / "dicom-node.db"))

        done = wait_for(all_stored, args.timeout, 0.02)
        stored = time.time()
        if not done:
            raise RuntimeError(f"storescp got {scp.count()} of {expected} in {args.timeout} s")
        rss = vm_hwm_mb(node.pid)
        child_rss = sum(vm_hwm_mb(pid) for pid in child_pids(node.pid))
    finally:
        stop_child_node(node)
        log.close()
        scp.stop()
    db = sqlite3.connect(data_dir / "dicom-node.db")
    try:
        events = db.execute("SELECT at, kind, detail FROM audit_events WHERE kind IN "
                            "('series.state', 'job.start', 'job.finish') ORDER BY id").fetchall()
        last_sent = db.execute("SELECT max(sent_at) FROM outbox").fetchone()[0]
        job_seconds = db.execute("SELECT seconds FROM jobs ORDER BY id DESC").fetchone()[0]
    finally:
        db.close()
    at: dict[str, float] = {}
    for ts, kind, detail in events:
        to = json.loads(detail or "{}").get("to") if kind == "series.state" else kind
        at.setdefault(str(to), parse_ts(ts))
    ready = at["ready"]
    return {"quiet": ready - acked,
            "to_job": at["job.start"] - ready,
            "job": float(job_seconds),
            "to_sent": parse_ts(last_sent) - at["job.finish"],
            "to_stored": stored - at["job.finish"],
            "first": first[0] - ready,
            "excl": stored - ready,
            "total": stored - acked,
            "rss": rss,
            "child_rss": child_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--slices", type=int, default=176)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--grace", type=float, default=3.0, help="series.complete_grace_s")
    parser.add_argument("--stable-after", type=float, default=30.0,
                        help="series.stable_after_s")
    parser.add_argument("--sweep", type=float, default=1.0, help="series.sweep_interval_s")
    parser.add_argument("--send-interval", type=float, default=1.0,
                        help="outbox.send_interval_s")
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--quick", action="store_true", help="1 run")
    parser.add_argument("--source", choices=("pattern", "phantom"), default="pattern",
                        help="the series sent: the test pattern every earlier round used "
                             "(default), or a phantom brain (the demo's patient: seed 0, "
                             "patient 1000, two tumours) at 1 mm slices")
    parser.add_argument("--weights", type=Path, default=None,
                        help="another weights file (default: the shipped demo model)")
    parser.add_argument("--inline-analysis", action="store_true",
                        help="analysis.separate_process = false (TBR in the job's thread)")
    parser.add_argument("--analysis-threads", type=int, default=0,
                        help="analysis.threads (0: CPUs - 1, at most 4)")
    parser.add_argument("--uncertainty-samples", type=int, default=4,
                        help="analysis.uncertainty_samples (default 4, the node's default; "
                             "0: no TBR intervals)")
    args = parser.parse_args()
    if args.weights is not None:
        # the node runs in a temporary directory: a relative path would be read from there
        args.weights = args.weights.resolve()
        if not args.weights.is_file():
            parser.error(f"--weights {args.weights}: no such file")
    runs = 1 if args.quick else max(1, args.runs)
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        source = (write_mr_series(root / "src", args.slices, 256, 256, seed=21)
                  if args.source == "pattern" else phantom_brain_series(root / "src", args.slices))
        for run in range(runs):
            results.append(one_run(root / f"run{run}", source, args))
    labels = [
        ("quiet/grace: storescu exit -> series ready (audit)", "quiet"),
        ("ready -> job start (sweep/triage/scheduler poll)", "to_job"),
        ("job (run_series: decode, inference, TBR, write, enqueue)", "job"),
        ("job end -> last outbox sent_at (send poll + C-STORE)", "to_sent"),
        ("job end -> last result file at storescp", "to_stored"),
        ("ready -> first result file at storescp", "first"),
        ("END TO END excluding quiet period (ready -> stored)", "excl"),
        ("END TO END including quiet period (storescu exit -> stored)", "total"),
        ("node peak RSS, MB (VmHWM)", "rss"),
        ("analysis process peak RSS, MB (VmHWM; 0 with --inline-analysis)", "child_rss"),
    ]
    rows: list[list[Any]] = []
    for label, key in labels:
        values = [r[key] for r in results]
        rows.append([label, fmt(median(values), 2), " ".join(fmt(v, 2) for v in values)])
    where = "job thread" if args.inline_analysis else "analysis process"
    threads = args.analysis_threads or f"auto = {AnalysisConfig().thread_count()}"
    print(f"End to end, {args.slices} x 256x256 T1C, storescu -> dicom-node serve (device "
          f"{args.device}, TBR in the {where} with {threads} thread(s), "
          f"{args.uncertainty_samples} uncertainty passes, complete_grace_s "
          f"{args.grace:g}, sweep {args.sweep:g} s, send poll {args.send_interval:g} s) -> "
          f"DCMTK storescp; median of {runs} run(s); {machine_line()}")
    print(table(["interval", "median s", "runs"], rows))
    print(f"reproduce: {command_line()}")


if __name__ == "__main__":
    main()
