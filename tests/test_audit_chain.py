"""The audit chain with several writers on one database, on SQLite and PostgreSQL: one
linear chain, a cursor reading ``id > last`` (the notifier's) never skips an event, and
every event names the node that wrote it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicom_node.cli import main
from storage.audit import AuditLog, verify_chain
from storage.database import make_engine, make_session_factory
from storage.models import AuditEvent

WRITERS = 4
EVENTS = 40


def test_writers_of_several_processes_keep_one_chain_and_the_cursor_misses_nothing(
        database_url: str) -> None:
    engine = make_engine(database_url)
    done = threading.Event()
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        # An AuditLog of its own: as another process, it shares no in-process lock.
        audit = AuditLog(make_session_factory(engine))
        try:
            for n in range(EVENTS):
                with audit.transaction() as session:
                    audit.record_in(session, "echo", peer=f"w{writer}", n=n)
                    audit.record_batched_in(session, "echo", peer=f"w{writer}", n=n, b=1)
        except BaseException as exc:
            errors.append(exc)

    seen: list[int] = []

    def read() -> None:
        """The notifier's read: everything after the last id it has seen."""
        sessions = make_session_factory(engine)
        last = 0
        while True:
            finished = done.is_set()
            with sessions() as session:
                ids = session.scalars(sa.select(AuditEvent.id).where(AuditEvent.id > last)
                                      .order_by(AuditEvent.id)).all()
            if ids:
                seen.extend(ids)
                last = ids[-1]
            if finished:
                return

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(120)
    done.set()
    reader.join(60)
    assert errors == []
    with make_session_factory(engine)() as session:
        check = verify_chain(session)
        all_ids = session.scalars(sa.select(AuditEvent.id).order_by(AuditEvent.id)).all()
    assert check.ok, check.reason
    assert check.events == WRITERS * EVENTS * 2
    assert seen == list(all_ids), "the cursor skipped an event committed after a later id"
    engine.dispose()


def test_every_event_names_its_node_and_the_chain_verifies_across_nodes(
        database_url: str, tmp_path: Path, test_weights: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two nodes and a writer from before migration 0004 (no node) append to one chain:
    each event carries its writer's name, ``verify_chain`` passes, a changed node breaks
    the link (also when moved into the detail), and ``dicom-node audit`` lists the node."""
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    receiver = AuditLog(sessions, node="host-a/receiver:11112")
    worker = AuditLog(sessions, node="host-b/worker:11112")
    legacy = AuditLog(sessions)  # as every writer did before the node column
    legacy.record("node.start", role="all")
    receiver.record("instance.stored", sop_uid="1.2.3.1", bytes=10)
    with worker.transaction() as session:
        worker.record_in(session, "job.start", series_uid="1.2.3", job=1)
        worker.record_batched_in(session, "output.written", series_uid="1.2.3.9", index=0)
    receiver.record("instance.stored", sop_uid="1.2.3.2", bytes=10)
    with sessions() as session:
        rows = session.execute(sa.select(AuditEvent.id, AuditEvent.kind, AuditEvent.node,
                                         AuditEvent.detail).order_by(AuditEvent.id)).all()
        assert [(kind, node) for _id, kind, node, _d in rows] == [
            ("node.start", ""), ("instance.stored", "host-a/receiver:11112"),
            ("job.start", "host-b/worker:11112"), ("output.written", "host-b/worker:11112"),
            ("instance.stored", "host-a/receiver:11112")]
        assert verify_chain(session).ok
    job_id, _kind, node, detail = rows[2]
    for change in ({"node": "host-c/worker:11112"},
                   {"node": "", "detail": f"{detail}\n{node}"},  # the node moved into the detail
                   {"node": "", "detail": f"{detail}|{node}"}):
        with sessions() as session:
            session.execute(sa.update(AuditEvent).where(AuditEvent.id == job_id).values(change))
            session.commit()
            check = verify_chain(session)
            assert check.first_broken_id == job_id, change
            assert check.reason == "content does not match its hash"
            session.execute(sa.update(AuditEvent).where(AuditEvent.id == job_id).values(
                node=node, detail=detail))
            session.commit()
            assert verify_chain(session).ok

    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "node"}"\n'
                      f'database_url = "{database_url}"\n'
                      f'[model]\nweights_path = "{test_weights}"\n')
    assert main(["audit", "--all", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "node (tail)" in lines[0]
    listed = [line.split()[4] for line in lines[1:]]  # date, time, outcome, kind, node
    assert listed == ["-", "host-a/receiver:11112", "host-b/worker:11112",
                      "host-b/worker:11112", "host-a/receiver:11112"]
    assert main(["audit", "--json", "--config", str(config)]) == 0
    assert [json.loads(line)["node"] for line in capsys.readouterr().out.splitlines()] == [
        node for _id, _kind, node, _d in rows]
    assert main(["audit", "--verify", "--config", str(config)]) == 0
    assert "audit chain intact: 5 events" in capsys.readouterr().out
    engine.dispose()
