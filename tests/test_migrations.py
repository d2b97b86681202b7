"""Schema by Alembic migrations, on SQLite and PostgreSQL: the migrated schema is the
models' schema, a database made by the old ``create_all`` is stamped and upgraded with
its rows, and processes starting together migrate once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from storage.audit import AuditLog, verify_chain
from storage.database import make_engine, make_session_factory
from storage.migrate import current_revision, head_revision, upgrade
from storage.models import AuditEvent, Base, Series

BASELINE = "0001_baseline"
REPO = Path(__file__).resolve().parents[1]


def _engine(url: str) -> sa.Engine:
    """An engine that does not migrate (make_engine does)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return sa.create_engine(url, poolclass=sa.NullPool)


def _differences(engine: sa.Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return [d for d in compare_metadata(context, Base.metadata)
                if not (isinstance(d, tuple) and d[0] == "remove_table"
                        and d[1].name == "alembic_version")]


def test_migrated_schema_equals_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    assert current_revision(engine) == head_revision()
    assert _differences(engine) == []
    engine.dispose()


def test_a_create_all_database_is_stamped_and_upgraded_with_its_rows(database_url: str) -> None:
    engine = _engine(database_url)
    # What the node made before Alembic: the baseline's tables, no alembic_version.
    upgrade(engine, BASELINE)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE alembic_version")
    sessions = make_session_factory(engine)
    audit = AuditLog(sessions)
    with audit.transaction() as session:
        session.add(Series(series_uid="1.2.3", study_uid="1.2"))
        audit.record_in(session, "series.state", series_uid="1.2.3", state="receiving")
    assert current_revision(engine) is None

    engine = make_engine(database_url)  # what a node does at start
    assert current_revision(engine) == head_revision()
    assert _differences(engine) == []
    with make_session_factory(engine)() as session:
        assert session.scalars(sa.select(Series.series_uid)).all() == ["1.2.3"]
        assert verify_chain(session).ok
    engine.dispose()


def test_audit_events_before_0004_keep_verifying_beside_events_that_name_their_node(
        database_url: str) -> None:
    """A database populated at 0003 (events without a node) upgraded to the head: the old
    events get an empty node, and the chain with a node's new events verifies."""
    engine = _engine(database_url)
    upgrade(engine, "0003_notification_claims")
    old = AuditLog(make_session_factory(engine))  # writes no node column, as before 0004
    with old.transaction() as session:
        session.add(Series(series_uid="1.2.3", study_uid="1.2"))
        old.record_in(session, "series.state", series_uid="1.2.3", state="receiving")
    old.record("job.start", series_uid="1.2.3", job=1)

    engine = make_engine(database_url)
    assert current_revision(engine) == head_revision()
    AuditLog(make_session_factory(engine), node="host/worker:104").record(
        "job.finish", series_uid="1.2.3", job=1)
    with make_session_factory(engine)() as session:
        assert session.execute(sa.select(AuditEvent.kind, AuditEvent.node)
                               .order_by(AuditEvent.id)).all() == [
            ("series.state", ""), ("job.start", ""), ("job.finish", "host/worker:104")]
        check = verify_chain(session)
        assert check.ok and check.events == 3, check.reason
    engine.dispose()


def test_downgrading_0004_is_refused_once_events_name_their_node(database_url: str) -> None:
    """Dropping the node column would make every event since 0004 fail verification: the
    downgrade refuses (restore the pre-upgrade backup instead); an empty one goes down."""
    from alembic import command

    from storage.migrate import alembic_config

    engine = make_engine(database_url)
    with engine.connect() as connection:  # nothing names a node yet: the downgrade works
        command.downgrade(alembic_config(connection), "0003_notification_claims")
        connection.commit()
    assert current_revision(engine) == "0003_notification_claims"
    upgrade(engine)
    AuditLog(make_session_factory(engine), node="host/worker:104").record("job.start", job=1)
    with engine.connect() as connection, pytest.raises(RuntimeError, match="would break the audit chain"):
        command.downgrade(alembic_config(connection), "0003_notification_claims")
    assert current_revision(engine) == head_revision()
    with make_session_factory(engine)() as session:
        assert verify_chain(session).ok
    engine.dispose()


def test_nodes_starting_together_migrate_once(database_url: str) -> None:
    """Four processes open an empty database at once (a node and its receive processes,
    or several nodes): one creates the schema, the others wait for its lock."""
    code = "import sys; from storage.database import make_engine; make_engine(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, database_url], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=120)[1] for p in procs]
    failures = [err for p, err in zip(procs, outputs, strict=True) if p.returncode != 0]
    assert failures == []
    assert current_revision(_engine(database_url)) == head_revision()
