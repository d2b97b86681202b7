"""Group commit: one thread that takes items off a queue and writes them in batches.

The receiver's instance rows and the sender's outcomes are both made durable this way:
the first item of a batch waits at most ``linger_s`` for more (``flush`` cuts that
short), the batch is written in one transaction, a failed write (database locked, disk
full) is retried after ``retry_delay_s``, and ``flush`` waits until everything submitted
so far is written. The two used to be two copies of this loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

T = TypeVar("T")


class GroupCommitter(Generic[T]):
    """Writes submitted items in batches on a thread of its own."""

    def __init__(self, write: Callable[[list[T]], None], *, name: str, linger_s: float,
                 max_batch: int = 512, retry_delay_s: float = 1.0,
                 retry_while_stopping: bool = False) -> None:
        """``retry_while_stopping``: keep retrying a failing batch after :meth:`stop`
        (its items cannot be recovered otherwise); if false, stop gives up on it (its
        items are recovered some other way, e.g. by the start-up scan)."""
        self._write = write
        self._name = name
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._retry_delay_s = retry_delay_s
        self._retry_while_stopping = retry_while_stopping
        self._urgent = threading.Event()
        self._queue: queue.Queue[T] = queue.Queue()
        self._submitted = 0
        self._committed = 0
        self._progress = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str = ""

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then end the thread."""
        self.flush(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # -- producer side ------------------------------------------------------------------
    def submit(self, item: T) -> None:
        with self._progress:
            self._submitted += 1
        self._queue.put(item)

    @property
    def pending(self) -> int:
        with self._progress:
            return self._submitted - self._committed

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        deadline = time.monotonic() + timeout_s
        self._urgent.set()
        with self._progress:
            target = self._submitted
            while self._committed < target:
                left = deadline - time.monotonic()
                if left <= 0 or (self._thread is None or not self._thread.is_alive()):
                    return self._committed >= target
                self._urgent.set()  # the batch being formed is written without lingering
                self._progress.wait(min(left, 0.01))
        return True

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            until = time.monotonic() + self._linger_s
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                left = until - time.monotonic()
                if left <= 0 or self._urgent.is_set() or self._stop.is_set():
                    break
                try:
                    batch.append(self._queue.get(timeout=min(left, 0.005)))
                except queue.Empty:
                    continue
            self._urgent.clear()
            self._write_until_done(batch)

    def _write_until_done(self, batch: list[T]) -> None:
        """Job boundary: a failed transaction is retried; the caller's work stays valid."""
        while True:
            try:
                self._write(batch)
                self.last_error = ""
                break
            except (SQLAlchemyError, OSError) as exc:
                self.last_error = f"writing {len(batch)} items ({self._name}) failed: {exc}"
                log.error("%s; retrying in %.0f s", self.last_error, self._retry_delay_s)
                if self._retry_while_stopping:
                    time.sleep(self._retry_delay_s)
                elif self._stop.wait(self._retry_delay_s):
                    break
        with self._progress:
            self._committed += len(batch)
            self._progress.notify_all()
