"""Schema creation and upgrades by Alembic migrations (``storage/migrations``).

Every process that opens the database (``dicom-node serve``, ``receive``, the admin
commands) runs :func:`upgrade` first: the database is brought to the newest revision
(``upgrade head``), an empty one created, and one made before Alembic by ``create_all``
stamped with the baseline. A database already at the head costs one query.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

# Alembic says at INFO what it sets up, from its import on (plugins, the DDL mode):
# chatter on the console of every command; an upgrade that happened is logged below, once.
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import Connection, Engine  # noqa: E402

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: Alembic runs env.py through module globals (alembic.context): one run per process at
#: a time; the database lock in env.py orders the processes.
_RUNNING = threading.Lock()

log = logging.getLogger(__name__)


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
    before = current_revision(engine)
    if revision == "head" and before == head_revision():
        return
    with _RUNNING, engine.connect() as connection:
        command.upgrade(alembic_config(connection), revision)
        connection.commit()
    after = current_revision(engine)
    if after != before:
        log.info("database schema at %s (was %s)", after, before or "empty or made by create_all")
