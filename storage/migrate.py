"""Schema creation and upgrades by Alembic migrations (``storage/migrations``).

Every process that opens the database (``dicom-node serve``, ``receive``, the admin
commands) runs :func:`upgrade` first: the database is brought to the newest revision
(``upgrade head``), an empty one created, and one made before Alembic by ``create_all``
stamped with the baseline. A database already at the head costs one query.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: Alembic runs env.py through module globals (alembic.context): one run per process at
#: a time; the database lock in env.py orders the processes.
_RUNNING = threading.Lock()


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """``alembic upgrade <revision>`` on this engine's database (serialised across
    processes: see migrations/env.py)."""
    if revision == "head" and current_revision(engine) == head_revision():
        return
    with _RUNNING, engine.connect() as connection:
        command.upgrade(alembic_config(connection), revision)
        connection.commit()
