"""The group-commit thread shared by the instance recorder and the sender's outcomes:
order kept, batches formed, failures retried, and a stop that never hangs on a dead
database unless told to keep trying."""

from __future__ import annotations

import threading

from sqlalchemy.exc import OperationalError

from storage.group_commit import GroupCommitter


def test_items_are_written_in_order_and_in_batches() -> None:
    batches: list[list[int]] = []
    committer: GroupCommitter[int] = GroupCommitter(batches.append, name="t", linger_s=0.5)
    committer.start()
    for item in range(20):
        committer.submit(item)
    assert committer.flush(30.0)
    committer.stop()
    assert [item for batch in batches for item in batch] == list(range(20))
    assert len(batches) < 20  # grouped, not one transaction per item
    assert committer.pending == 0


def test_a_failed_batch_is_retried_and_the_error_cleared() -> None:
    written: list[int] = []
    failures = [OperationalError("INSERT", {}, Exception("database is locked"))]

    def write(batch: list[int]) -> None:
        if failures:
            raise failures.pop()
        written.extend(batch)

    committer: GroupCommitter[int] = GroupCommitter(write, name="t", linger_s=0.0,
                                                    retry_delay_s=0.01)
    committer.start()
    committer.submit(1)
    assert committer.flush(30.0)
    committer.stop()
    assert written == [1] and committer.last_error == ""


def test_stop_gives_up_on_a_dead_database_unless_told_to_keep_trying() -> None:
    def never(batch: list[int]) -> None:
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    committer: GroupCommitter[int] = GroupCommitter(never, name="t", linger_s=0.0,
                                                    retry_delay_s=0.01)
    committer.start()
    committer.submit(1)
    assert not committer.flush(0.2)
    committer.stop(timeout_s=0.2)  # returns: the recorder's files are recovered at start
    assert "disk I/O error" in committer.last_error
    # the sender's outcomes keep trying until written
    recovered = threading.Event()
    calls: list[int] = []

    def flaky(batch: list[int]) -> None:
        calls.append(len(batch))
        if not recovered.is_set():
            raise OperationalError("UPDATE", {}, Exception("database is locked"))

    stubborn: GroupCommitter[int] = GroupCommitter(flaky, name="t", linger_s=0.0,
                                                   retry_delay_s=0.01,
                                                   retry_while_stopping=True)
    stubborn.start()
    stubborn.submit(1)
    assert not stubborn.flush(0.1)
    recovered.set()
    assert stubborn.flush(30.0)
    stubborn.stop()
    assert len(calls) >= 2 and stubborn.pending == 0
