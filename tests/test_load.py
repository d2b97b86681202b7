"""Load: 8 concurrent associations x 300 instances while the node processes and sends, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import func, select

from storage.models import Instance, Series
from tests.conftest import wait_for, written_outputs
from tests.dicom_factory import SeriesSpec, write_series
from tests.test_crash_safety import NodeProcess, Setup, _db, _send, setup  # noqa: F401

SENDERS = 8
INSTANCES = 300


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_eight_concurrent_senders(database_url: str, tmp_path: Path,
                                  setup: Setup) -> None:  # noqa: F811
    config, port, pacs, data, url = setup.config, setup.port, setup.pacs, setup.data, setup.url
    pacs.delay_s = 0.0
    series = [write_series(tmp_path / f"s{i}", SeriesSpec(
        n_slices=INSTANCES, rows=32, columns=32, slice_spacing_mm=1.0,
        description=f"T1 +C ax load {i}"), seed=100 + i) for i in range(SENDERS)]
    node = NodeProcess(config, port).start()
    assert node.proc is not None
    results: list[int] = [0] * SENDERS

    def send(i: int) -> None:
        results[i] = _send(series[i], port)

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=1800)  # bounded by the SCU timeouts; an outcome, not a pace
        # no association refused below the limit (10), every instance acknowledged
        assert results == [INSTANCES] * SENDERS
        with _db(url) as session:
            stored = session.scalar(select(func.count()).select_from(Instance))
            counts = session.scalars(select(Series.instance_count)).all()
        assert stored == SENDERS * INSTANCES
        assert sorted(counts) == [INSTANCES] * SENDERS
        files = list((data / "store" / "incoming").rglob("*.dcm"))
        assert len(files) == SENDERS * INSTANCES

        def all_done() -> bool:
            with _db(url) as session:
                return set(session.scalars(select(Series.state)).all()) == {"done"}

        assert wait_for(all_done, 900, 1.0)
        def expected() -> int:  # per series SC per slice, SEG, SR, KOS (+ image SR)
            with _db(url) as session:
                return max(SENDERS * (INSTANCES + 3), written_outputs(session))

        assert wait_for(lambda: pacs.unique() == expected(), 600, 1.0)
        peak = _peak_rss_mb(node.proc.pid)
        print(f"\nload: {SENDERS} x {INSTANCES} instances stored and processed; "
              f"node peak RSS {peak:.0f} MB")
        assert peak < 4096  # bounded: a few hundred MB for torch + one series
    finally:
        node.stop()
