"""Alembic environment. The node runs the migrations itself (:func:`storage.migrate.upgrade`)
on a connection it hands over in ``config.attributes["connection"]``; there is no
alembic.ini.

One migration run at a time: PostgreSQL takes a transaction-level advisory lock and
SQLite the write lock (BEGIN IMMEDIATE) before reading the schema's version, so processes
starting together (a node, its ``dicom-node receive`` processes, other nodes on the same
database) wait for each other instead of racing on ``CREATE TABLE``; the whole upgrade is
one transaction (PostgreSQL and SQLite both have transactional DDL).

A database made by the node before Alembic (``create_all``: the tables, no
``alembic_version``) holds exactly the baseline schema: it is stamped with the baseline
under the same lock, then upgraded like any other.
"""

from __future__ import annotations

from alembic import context
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from storage.models import Base

#: ``pg_advisory_xact_lock`` key of a schema migration.
MIGRATION_LOCK_KEY = 0x64636D6E6D6967
#: The schema the node created with ``create_all`` before Alembic.
BASELINE = "0001_baseline"


def run_migrations_online() -> None:
    config = context.config
    connection = config.attributes["connection"]
    context.configure(connection=connection, target_metadata=Base.metadata,
                      transactional_ddl=True, compare_type=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        elif connection.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        tables = set(inspect(connection).get_table_names())
        if "alembic_version" not in tables and "series" in tables:
            context.get_context().stamp(ScriptDirectory.from_config(config), BASELINE)
        context.run_migrations()


run_migrations_online()
