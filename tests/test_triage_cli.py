"""Triage from the command line beside a running node: the audit and the outbox found by
the UID tails they print, per-instance events collapsed, the real reason of a failed
send, and the admin's reprocess and discard, audited with who ran them."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import func, select

from dicom_node.config import NodeConfig
from dicom_node.errors import RequestRefused
from dicom_node.outbox.enqueue import enqueue_outputs
from dicom_node.series.lookup import resolve_series_uid
from dicom_node.series.tracking import discard
from dicom_node.service import Node
from storage.audit import AuditLog
from storage.database import make_engine, make_session_factory
from storage.models import Job, JobState, OutboxEntry, OutputInstance, Series, SeriesState
from tests.conftest import PynetdicomPacs, free_port, pynetdicom_send, wait_for
from tests.dicom_factory import SeriesSpec, write_series


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", args[0], "--config",
                           str(config), *args[1:]], capture_output=True, text=True,
                          timeout=120, check=False)


def _ok(config: Path, *args: str) -> str:
    result = _cli(config, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _config_file(tmp_path: Path, config: NodeConfig, pacs_port: int, later_port: int) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
data_dir = "{config.data_dir}"
[receiver]
port = {config.receiver.port}
[model]
weights_path = "{config.model.weights_path}"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
[[destinations]]
name = "later"
ae_title = "LATER"
host = "127.0.0.1"
port = {later_port}
""")
    return path


def _lines(text: str, *words: str) -> list[str]:
    return [line for line in text.splitlines() if all(word in line for word in words)]


def test_triage_reprocess_and_discard_beside_a_running_node(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    later_port = free_port()  # nothing listens there yet: connection refused
    config = make_config(destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pynetdicom_pacs.port},
        {"name": "later", "ae_title": "LATER", "host": "127.0.0.1", "port": later_port}])
    path = _config_file(tmp_path, config, pynetdicom_pacs.port, later_port)
    node = start_node(config)
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=43)
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    tail = series_uid[-12:]
    assert pynetdicom_send(files, node.receiver.port) == [0] * 8
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 11, 120)

    # The outbox: a header, the real reason of the failure and when it is tried next.
    assert wait_for(lambda: "connection refused" in _ok(
        path, "outbox", "--destination", "later", "--state", "pending"), 60)
    listing = _ok(path, "outbox", "--series", tail)
    assert listing.startswith("outbox: 22 entries in 8 line(s)")
    assert "next retry (UTC)" in listing.splitlines()[1]
    study_tail = str(dcmread(files[0]).StudyInstanceUID)[-10:]
    assert _lines(_ok(path, "audit", "--study", study_tail, "--kind", "send.attempt"),
                  "error", "LATER@", "ACC00043", "connection refused")
    refused = _lines(listing, "later", "pending", "connection refused", "ACC00043", tail)
    assert len(refused) == 4  # SC, SEG, SR and KOS series, one line each
    assert _lines(listing, "pacs", "sent", "ACC00043")
    sc_line = _lines(listing, "later", " sc ")[0]
    assert sc_line.split()[4] == "8"  # eight SC entries in one line
    assert re.search(r" pending +sc +8 +\d+ +(now|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", sc_line)
    every = _ok(path, "outbox", "--series", tail, "--all", "--destination", "later")
    assert every.startswith("outbox: 11 entries\n") and len(_lines(every, "later")) == 11
    assert _ok(path, "outbox", "--all", "--limit", "4").startswith(
        "outbox: 22 entries; the newest 4 shown (--limit)\n")
    assert _ok(path, "outbox", "--state", "dead").splitlines() == ["outbox: 0 entries"]

    # The audit: the listed tail finds the series; per-instance events collapsed.
    collapsed = _ok(path, "audit", "--series", tail, "--limit", "200")
    stored = _lines(collapsed, "instance.stored")
    assert len(stored) == 1 and "[8 events to" in stored[0] and "ACC00043" in stored[0]
    assert _lines(collapsed, "send.attempt", "ok", "pacs")  # the outputs' sends included
    everything = _ok(path, "audit", "--series", tail, "--all", "--limit", "1000")
    assert len(_lines(everything, "instance.stored")) == 8
    assert len(_lines(everything, "send.attempt", '"destination": "pacs"')) == 11
    assert series_uid[-24:] in stored[0]

    # Discard: the waiting entries are dropped, recorded with who did it.
    user = getpass.getuser()
    sudo = os.environ.get("SUDO_USER")
    if sudo and sudo != user:  # as the CLI names an admin working through sudo
        user = f"{user} (sudo by {sudo})"
    discarded = _ok(path, "discard", tail)
    assert "discarded (was done); 11 outbox entries dropped" in discarded
    assert _ok(path, "outbox", "--destination", "later", "--state", "pending"
               ).splitlines() == ["outbox: 0 entries"]
    assert _lines(_ok(path, "outbox", "--destination", "later"), "discarded",
                  f"series discarded by {user} (last failure: connection refused")
    events = [json.loads(line) for line in _ok(
        path, "audit", "--series", series_uid, "--json", "--limit", "1000").splitlines()]
    assert any(e["kind"] == "outbox.discard" and json.loads(e["detail"])["requested_by"] == user
               for e in events)
    assert any(e["kind"] == "series.state" and json.loads(e["detail"])["to"] == "discarded"
               for e in events)
    again = _cli(path, "discard", tail)
    assert again.returncode == 2 and "already discarded" in again.stderr

    # The destination comes back. Reprocess: a new version goes to both destinations;
    # the discarded entries of the first version never do (they would be due within
    # retry_max_s, long before the new version is written).
    later = PynetdicomPacs(tmp_path / "later", ae_title="LATER", port=later_port).start()
    try:
        assert "as version 2" in _ok(path, "reprocess", "..." + tail)
        assert wait_for(lambda: len(later.received.files()) == 11, 120)
        assert wait_for(lambda: len(pynetdicom_pacs.received.files()) == 22, 60)
        numbers = {int(dcmread(p, stop_before_pixels=True).SeriesNumber)
                   for p in later.received.files()}
        assert numbers == {9911, 9912, 9913, 9915}  # version 2 only (9901.. + 10)
    finally:
        later.stop()
    events = [json.loads(line) for line in _ok(
        path, "audit", "--series", tail, "--kind", "series.state", "--json").splitlines()]
    reprocessed = [e for e in events if json.loads(e["detail"])["reason"]
                   == f"reprocess requested by {user}"]
    assert len(reprocessed) == 1 and json.loads(reprocessed[0]["detail"])["version"] == 2

    # Retry is audited with the user too.
    assert "re-queued 0 dead letter(s)" in _ok(path, "outbox", "retry")
    retry = json.loads(_ok(path, "audit", "--kind", "outbox.retry", "--json").splitlines()[-1])
    assert json.loads(retry["detail"])["requested_by"] == user


def test_uid_tails_unique_exact_or_refused_with_the_candidates(
        database_url: str, tmp_path: Path) -> None:
    sessions = make_session_factory(make_engine(database_url))
    with sessions() as session:
        for uid in ("1.2.3.45", "1.2.3.345", "1.2.9.77"):
            session.add(Series(series_uid=uid, study_uid="1.2.3"))
        session.commit()
        assert resolve_series_uid(session, "345") == "1.2.3.345"
        assert resolve_series_uid(session, "1.2.3.45") == "1.2.3.45"  # exact wins
        assert resolve_series_uid(session, "...77") == "1.2.9.77"
        with pytest.raises(RequestRefused, match=r"ambiguous.*1\.2\.3\.345, 1\.2\.3\.45"):
            resolve_series_uid(session, "45")
        with pytest.raises(RequestRefused, match="no series UID"):
            resolve_series_uid(session, "99")
        with pytest.raises(RequestRefused, match="not a UID"):
            resolve_series_uid(session, "4%")
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "node"\ndatabase_url = "{database_url}"\n'
                      '[model]\nweights_path = "w.pt"\n')
    result = _cli(config, "audit", "--series", "45")
    assert result.returncode == 2 and "1.2.3.345" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli(config, "reprocess", "45")
    assert result.returncode == 2 and "ambiguous" in result.stderr
    result = _cli(config, "reprocess", "77")
    assert result.returncode == 2 and "receiving: it will be processed anyway" in result.stderr


def test_a_job_finishing_after_a_discard_queues_nothing(
        database_url: str,
        tmp_path: Path, make_config: Callable[..., NodeConfig]) -> None:
    """The job that ran while the admin discarded its series records its outputs but
    queues none: enqueue_outputs reads the state in its own write transaction."""
    config = make_config(destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}])
    sessions = make_session_factory(make_engine(config.database_url))
    audit = AuditLog(sessions)
    with audit.transaction() as session:
        series = Series(series_uid="1.2.3.4", study_uid="1.2.3", state=SeriesState.RUNNING)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, series_version=1, state=JobState.RUNNING)
        session.add(job)
        session.flush()
        series_id, job_id = series.id, job.id
    written: list[tuple[str, object, Path]] = []
    for index in range(2):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.3.4.9.{index}"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SeriesInstanceUID = "1.2.3.4.9"
        written.append(("sc", ds, tmp_path / f"{index}.dcm"))
    with audit.transaction() as session:
        running = session.get(Series, series_id)
        assert running is not None
        discard(audit, session, running, "tester")
    assert enqueue_outputs(config, audit, series_id, job_id, 1, written, None) == 0
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboxEntry)) == 0
        assert session.scalar(select(func.count()).select_from(OutputInstance)) == 2
        assert session.scalar(select(Series.state)) == SeriesState.DISCARDED
