"""Several nodes on one PostgreSQL: ingest with 1, 2 and 3 receiver processes against one
on SQLite, and jobs with 1 and 2 workers, side by side in one run.

Every node is a real ``dicom-node serve --role receiver|worker`` process on loopback;
PostgreSQL is a throw-away cluster with its durable defaults (fsync and synchronous
commit on; SQLite runs as the node configures it, WAL with ``synchronous=NORMAL``).

Ingest: ``--senders`` DCMTK storescu processes (TCP_NODELAY=1), each sending a series of
its own, spread round-robin over the receivers. Clock from the senders' start to the
last instance *recorded* (its row committed: polled in the database), and the senders'
wall clock beside it. Checked per cell: every instance recorded once, one
``instance.stored`` event each, named by the receiver that took it, and the audit chain
verifies.

Jobs: T1C series sent at once to one receiver while the workers run (demo model, CPU).
Clock from the last sender's exit to every series done; the quiet period before a
series is ready (``complete_grace_s``, 3 s) is inside it. Checked: the latest version of
every series done by exactly one job, no version by two. A series can be judged complete
before its last instances are recorded (these test series declare no
ImagesInAcquisition, so a contiguous prefix looks complete after the grace): its late
instances then reopen it as version 2 (the running version 1 job commits nothing), a
second job by design; such reopened series are counted, not hidden. The cells run
interleaved, run by run, so background load hits them alike.

    .venv/bin/python -m benchmarks.multi_node [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, func, select

from benchmarks._common import (
    DEMO_WEIGHTS,
    command_line,
    fmt,
    free_port,
    machine_line,
    median,
    node_raw_config,
    storescu_popen,
    table,
    wait_for,
    write_mr_series,
)
from benchmarks.ingest import _toml
from dicom_node.cli import stop_child_node

SQLITE, POSTGRES = "SQLite", "PostgreSQL"
INGEST_CELLS = [(SQLITE, 1), (POSTGRES, 1), (POSTGRES, 2), (POSTGRES, 3)]
JOB_CELLS = [(SQLITE, 1), (POSTGRES, 1), (POSTGRES, 2)]
#: series.complete_grace_s of the job cells (a shorter one reopens more series under load)
COMPLETE_GRACE_S = 3.0


class Databases:
    """A fresh database per cell: a SQLite file, or a database on one PostgreSQL cluster."""

    def __init__(self) -> None:
        from tests.postgres import PostgresCluster, find_bin

        if find_bin("initdb") is None or find_bin("pg_ctl") is None:
            raise SystemExit("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                             "'make install' installs Debian postgresql")
        self.cluster = PostgresCluster(durable=True).start()

    def url(self, backend: str, work: Path) -> str:
        if backend == SQLITE:
            return f"sqlite:///{work / 'node' / 'dicom-node.db'}"
        return self.cluster.url(self.cluster.create_database())

    def stop(self) -> None:
        self.cluster.stop()


@dataclass
class Role:
    """One ``dicom-node serve --role`` process."""

    proc: subprocess.Popen[str]
    log: IO[str]
    log_path: Path

    def stop(self) -> None:
        stop_child_node(self.proc, 300)
        self.log.close()


def start_role(role: str, raw: dict[str, Any], work: Path, name: str) -> Role:
    """Start ``role`` with the config ``raw`` and wait for its ready line (its port is not
    probed: a probe is a half-open association the receiver counts)."""
    config = work / f"{name}.toml"
    config.write_text(_toml(raw))
    log_path = work / f"{name}.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--role", role,
                             "--config", str(config)], stdout=subprocess.PIPE, stderr=log,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "... listening as ...", or "" if it exited
    if "listening as" not in line:
        proc.kill()
        proc.wait()
        log.close()
        raise RuntimeError(f"{role} did not start: {line!r}; its log ends: "
                           f"{log_path.read_text(errors='replace')[-800:]}")
    return Role(proc, log, log_path)


def _raw(work: Path, url: str, port: int, **sections: dict[str, Any]) -> dict[str, Any]:
    raw = node_raw_config(work / "node", port, **sections)
    raw["node"]["database_url"] = url
    return raw


def _count(engine: Engine, query: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(query).scalar() or 0)


@dataclass
class IngestResult:
    recorded_s: float
    senders_s: float
    problems: list[str]


def run_ingest(backend: str, receivers: int, series: list[list[Path]], work: Path,
               databases: Databases) -> IngestResult:
    from storage.audit import verify_chain
    from storage.database import make_engine, make_session_factory
    from storage.models import AuditEvent, Instance

    url = databases.url(backend, work)
    ports = [free_port() for _ in range(receivers)]
    roles: list[Role] = []
    engine: Engine | None = None
    total = sum(len(files) for files in series)
    try:
        for index, port in enumerate(ports):
            raw = _raw(work, url, port, series={"stable_after_s": 3600.0})
            roles.append(start_role("receiver", raw, work, f"receiver{index}"))
        engine = make_engine(url)
        recorded = select(func.count()).select_from(Instance)
        started = time.perf_counter()
        senders = [storescu_popen(files, ports[i % receivers], "DICOMNODE")
                   for i, files in enumerate(series)]
        for sender in senders:
            _, err = sender.communicate(timeout=1800)
            if sender.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-300:]}")
        senders_s = time.perf_counter() - started
        if not wait_for(lambda: _count(engine, recorded) >= total, 600, 0.02):
            raise RuntimeError(f"only {_count(engine, recorded)} of {total} recorded")
        recorded_s = time.perf_counter() - started
    finally:
        for role in roles:
            role.stop()
    problems: list[str] = []
    with make_session_factory(engine)() as session:
        sops = session.execute(select(Instance.sop_uid)).scalars().all()
        if len(sops) != total or len(set(sops)) != total:
            problems.append(f"{len(sops)} instance rows ({len(set(sops))} distinct) for {total}")
        stored = Counter(session.execute(select(AuditEvent.node).where(
            AuditEvent.kind == "instance.stored")).scalars())
        if sum(stored.values()) != total or len(stored) != receivers:
            problems.append(f"instance.stored events by node: {dict(stored)}")
        check = verify_chain(session)
        if not check.ok:
            problems.append(f"audit chain broken at {check.first_broken_id}: {check.reason}")
    engine.dispose()
    return IngestResult(recorded_s, senders_s, problems)


@dataclass
class JobResult:
    wall_s: float
    job_s: list[float]
    per_worker: list[int]
    reopened: int  # series that a late instance reopened (version 2: a second job)
    problems: list[str]


def run_jobs(backend: str, workers: int, series: list[list[Path]], work: Path,
             databases: Databases) -> JobResult:
    from storage.database import make_engine
    from storage.models import Job, JobState, Series, SeriesState

    url = databases.url(backend, work)
    timing = {"stable_after_s": 10.0, "complete_grace_s": COMPLETE_GRACE_S,
              "sweep_interval_s": 0.2}
    model = {"weights_path": str(DEMO_WEIGHTS), "device": "cpu", "batch_size": 16}
    roles: list[Role] = []
    engine: Engine | None = None
    try:
        receiver_port = free_port()
        roles.append(start_role("receiver", _raw(work, url, receiver_port, series=timing),
                                work, "receiver"))
        for index in range(workers):
            roles.append(start_role("worker", _raw(work, url, free_port(), series=timing,
                                                   model=model), work, f"worker{index}"))
        engine = make_engine(url)
        senders = [storescu_popen(files, receiver_port, "DICOMNODE") for files in series]
        for sender in senders:
            _, err = sender.communicate(timeout=1800)
            if sender.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-300:]}")
        sent = time.perf_counter()
        finished = select(func.count()).select_from(Series).where(
            Series.state.in_([SeriesState.DONE, SeriesState.SKIPPED, SeriesState.FAILED]))
        if not wait_for(lambda: _count(engine, finished) >= len(series), 3600, 0.1):
            raise RuntimeError(f"only {_count(engine, finished)} of {len(series)} series done")
        wall_s = time.perf_counter() - sent
    finally:
        for role in roles:
            role.stop()
    problems: list[str] = []
    with engine.connect() as connection:
        jobs = connection.execute(select(Job.series_id, Job.series_version, Job.state,
                                         Job.owner, Job.seconds)).all()
        versions = dict(connection.execute(select(Series.id, Series.version)).all())
        states = Counter(connection.execute(select(Series.state)).scalars())
    done = Counter((series_id, version) for series_id, version, state, _o, _s in jobs
                   if state == JobState.DONE)
    if states != Counter({SeriesState.DONE: len(series)}):
        problems.append(f"series states {dict(states)}")
    # the latest version of each series done by one job; no version by two (an earlier
    # version a late instance superseded while it ran has none: its job was abandoned)
    latest = {(series_id, last) for series_id, last in versions.items()}
    if not latest <= set(done) or set(done.values()) != {1}:
        problems.append(f"done jobs per series version {sorted(done.values())}; latest "
                        f"versions not done: {sorted(latest - set(done))}")
    owners = Counter(owner for _s, _v, state, owner, _t in jobs if state == JobState.DONE)
    engine.dispose()
    return JobResult(wall_s, [s for _i, _v, state, _o, s in jobs if state == JobState.DONE and s],
                     sorted(owners.values(), reverse=True),
                     sum(1 for version in versions.values() if version > 1), problems)


def _fresh(root: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="cell-", dir=root))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--quick", action="store_true",
                        help="1 run, fewer and smaller series")
    parser.add_argument("--senders", type=int, default=6,
                        help="concurrent storescu senders for ingest, one series each")
    args = parser.parse_args()
    runs = 1 if args.quick else max(1, args.runs)
    ingest_slices = 40 if args.quick else 100  # per sender, 256x256
    job_series, job_slices = (4, 24) if args.quick else (6, 48)
    ingest_s: dict[tuple[str, int], list[IngestResult]] = defaultdict(list)
    jobs_s: dict[tuple[str, int], list[JobResult]] = defaultdict(list)
    databases = Databases()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-multi-node-") as tmp:
            root = Path(tmp)
            ingest_series = [write_mr_series(root / f"in{i}", ingest_slices, 256, 256,
                                             seed=300 + i, description=f"T1 +C ax in {i}")
                             for i in range(args.senders)]
            t1c = [write_mr_series(root / f"job{i}", job_slices, 256, 256, seed=400 + i)
                   for i in range(job_series)]
            def ingest(backend: str, receivers: int) -> None:
                ingest_s[(backend, receivers)].append(
                    run_ingest(backend, receivers, ingest_series, _fresh(root), databases))

            def jobs(backend: str, workers: int) -> None:
                jobs_s[(backend, workers)].append(
                    run_jobs(backend, workers, t1c, _fresh(root), databases))

            cells: list[tuple[str, Callable[[], None]]] = [
                *((f"ingest {b} x{n}", partial(ingest, b, n)) for b, n in INGEST_CELLS),
                *((f"jobs {b} x{n}", partial(jobs, b, n)) for b, n in JOB_CELLS)]
            for run in range(runs):
                for label, cell in cells:
                    print(f"run {run + 1}/{runs}: {label}", file=sys.stderr, flush=True)
                    cell()
    finally:
        databases.stop()

    total = args.senders * ingest_slices
    print(f"Ingest: {args.senders} storescu senders x {ingest_slices} MR 256x256 instances "
          f"({total} in all), `serve --role receiver` processes; median of {runs} run(s); "
          f"{machine_line()}")
    rows = []
    base = median([r.recorded_s for r in ingest_s[(SQLITE, 1)]])
    for backend, receivers in INGEST_CELLS:
        results = ingest_s[(backend, receivers)]
        recorded = median([r.recorded_s for r in results])
        problems = sorted({p for r in results for p in r.problems})
        rows.append([backend, receivers, fmt(total / recorded, 0), fmt(recorded, 2),
                     fmt(median([r.senders_s for r in results]), 2), fmt(base / recorded, 2),
                     "; ".join(problems) or "all recorded once, chain ok"])
    print(table(["database", "receivers", "inst/s recorded", "to last recorded s",
                 "senders s", "x SQLite x1", "checks"], rows))
    print()
    print(f"Jobs: {job_series} T1C series x {job_slices} slices 256x256 sent at once, demo "
          f"model on CPU, `serve --role worker` processes; median of {runs} run(s)")
    rows = []
    for backend, workers in JOB_CELLS:
        job_results = jobs_s[(backend, workers)]
        wall = median([r.wall_s for r in job_results])
        problems = sorted({p for r in job_results for p in r.problems})
        rows.append([backend, workers, fmt(job_series / wall * 60, 1), fmt(wall, 1),
                     fmt(median([s for r in job_results for s in r.job_s]), 2),
                     " / ".join("+".join(str(n) for n in r.per_worker) for r in job_results),
                     " / ".join(str(r.reopened) for r in job_results),
                     "; ".join(problems) or "each series version done once"])
    print(table(["database", "workers", "series/min", "wall s", "median job s",
                 "jobs per worker", "reopened", "checks"], rows))
    print(f"reproduce: {command_line()}")


if __name__ == "__main__":
    main()
