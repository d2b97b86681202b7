"""The audit chain with several writers on one database, on SQLite and PostgreSQL: one
linear chain, and a cursor reading ``id > last`` (the notifier's) never skips an event."""

from __future__ import annotations

import threading

import sqlalchemy as sa

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
