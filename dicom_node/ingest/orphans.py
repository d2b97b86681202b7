"""What a dead receiver left in the shared store: instances it confirmed to the PACS whose
rows it never committed, and its temporary files.

A receiver answers a C-STORE once the file is durable and commits the row with its next
batch, milliseconds later; a receiver killed in between leaves a confirmed instance as a
file in ``incoming/`` without a row. One node alone (SQLite) records every such file at
its start. Where nodes share the database and the store, a file without a row may be a
live receiver's whose row is a moment away, so a receiver takes only files unchanged for
``receiver.orphan_grace_s``, at its start and then every ``orphan_sweep_interval_s``:
the instances a crashed receiver confirmed reach the series they belong to within
minutes, with no one restarting anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import NodeConfig
from dicom_node.ingest.receiver import Receiver
from storage.file_store import FileStore

log = logging.getLogger(__name__)


def shares_database(config: NodeConfig) -> bool:
    """Can other nodes write this node's database and store? (everything but SQLite)"""
    return not config.database_url.startswith("sqlite")


@dataclass
class OrphanSweep:
    """Records a dead receiver's rowless files and removes its temporary files, those
    older than the grace (0 at the start of a node alone on SQLite)."""

    config: NodeConfig
    receiver: Receiver
    store: FileStore
    _next_s: float = field(default=0.0, init=False)

    @property
    def grace_s(self) -> float:
        return self.config.receiver.orphan_grace_s

    def at_start(self) -> tuple[int, int]:
        """(temporary files removed, instances recorded) before the receiver starts."""
        grace = self.grace_s if shares_database(self.config) else 0.0
        self._next_s = time.monotonic() + self.config.receiver.orphan_sweep_interval_s
        return (self.store.remove_partials(grace),
                self.receiver.record_unrecorded_files(grace))

    def run_if_due(self) -> int:
        """While running (only where the store is shared): the sweep, when it is due;
        returns the instances recorded."""
        if not shares_database(self.config) or time.monotonic() < self._next_s:
            return 0
        self._next_s = time.monotonic() + self.config.receiver.orphan_sweep_interval_s
        try:
            removed = self.store.remove_partials(self.grace_s)
            recorded = self.receiver.record_unrecorded_files(self.grace_s)
        except (SQLAlchemyError, OSError) as exc:  # the database or the store is away: next time
            log.error("orphan sweep failed, tried again in %g s: %s",
                      self.config.receiver.orphan_sweep_interval_s, exc)
            return 0
        if removed or recorded:
            log.warning("orphan sweep: recorded %d instances a receiver confirmed without a "
                        "row, removed %d temporary files (older than %g s)", recorded,
                        removed, self.grace_s)
        return recorded
