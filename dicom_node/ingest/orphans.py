"""What a dead receiver left in the shared store: instances it confirmed to the PACS whose
rows it never committed, and its temporary files.

A receiver answers a C-STORE once the file is durable and commits the row with its next
batch, milliseconds later; a receiver killed in between leaves a confirmed instance as a
file in ``incoming/`` without a row. A node alone (role ``all`` on SQLite) records every
such file at its start. Where nodes share the database and the store, a file without a
row may be a live receiver's whose row is a moment away, so a receiver takes only files
unchanged for ``receiver.orphan_grace_s``, at its start and then every
``orphan_sweep_interval_s`` in a thread of its own: the instances a crashed receiver
confirmed reach their series within minutes, with no one restarting anything.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import NodeConfig
from dicom_node.ingest.receiver import Receiver
from storage.file_store import FileStore

log = logging.getLogger(__name__)


def alone(config: NodeConfig) -> bool:
    """Is this node the only one that can write its store? (role ``all`` on SQLite)"""
    return config.role == "all" and config.database_url.startswith("sqlite")


@dataclass
class OrphanSweep:
    """Records a dead receiver's rowless files in ``incoming/`` and removes its temporary
    files there, those unchanged for the grace (every one at the start of a node alone)."""

    config: NodeConfig
    receiver: Receiver
    store: FileStore
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    @property
    def grace_s(self) -> float:
        return self.config.receiver.orphan_grace_s

    def at_start(self) -> tuple[int, int]:
        """(temporary files removed, instances recorded) before the receiver starts; a
        node alone takes them all, whatever their age (the whole store's temporary files
        too: nothing else writes it)."""
        if alone(self.config):
            return (self.store.remove_partials(),
                    self.receiver.record_unrecorded_files())
        try:
            return self.sweep()
        except SQLAlchemyError as exc:  # e.g. a peer recorded the same file first
            log.warning("orphan sweep at start failed, the periodic sweep retries: %s", exc)
            return (0, 0)

    def sweep(self) -> tuple[int, int]:
        """One pass over ``incoming/`` with the grace: (removed, recorded)."""
        return (self.store.remove_partials(self.grace_s, under=self.store.incoming),
                self.receiver.record_unrecorded_files(self.grace_s))

    def start(self) -> None:
        """The periodic sweep, in a thread of its own (a large store on NFS takes a while
        to list; the main thread answers signals and the watchdog), where nodes share
        the store."""
        if alone(self.config) or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="orphan-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.config.receiver.orphan_sweep_interval_s):
            try:
                removed, recorded = self.sweep()
            except Exception:  # job boundary: the next pass tries again (database away...)
                log.exception("orphan sweep failed; tried again in %g s",
                              self.config.receiver.orphan_sweep_interval_s)
                continue
            if removed or recorded:
                log.warning("orphan sweep: recorded %d instances a receiver confirmed "
                            "without a row, removed %d temporary files (older than %g s)",
                            recorded, removed, self.grace_s)
