"""A sender killed mid-send, as real processes on one PostgreSQL: its leased outbox rows
are sent by another sender once the lease has lapsed, and no instance whose sending was
confirmed (its row committed ``sent``) is sent again.

What is asserted, exactly: sender A claims every row and sends until the PACS holds one
C-STORE unanswered; A is SIGKILLed there. Then

- sender B, running since before the kill, sent nothing while A held its claims;
- every instance reaches the PACS; every row ends ``sent``, the ones A confirmed claimed
  by A and the rest by B, each with exactly one successful ``send.attempt`` event, named
  by the sender that made it;
- an instance A had confirmed before the kill arrived exactly once;
- the one instance in flight at the kill (received, never answered, so not confirmed)
  arrives twice: C-STORE is at-least-once, and a PACS stores a re-sent SOP Instance UID
  once. No other instance arrives twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from benchmarks._common import free_port
from storage.database import make_engine, make_session_factory
from storage.models import (
    AuditEvent,
    Job,
    JobState,
    NodeHeartbeat,
    OutboxEntry,
    OutboxState,
    OutputInstance,
    Series,
)
from tests.conftest import subprocess_node_toml, wait_for
from tests.dicom_factory import SeriesSpec, write_series

INSTANCES = 12
#: The PACS answers the first HOLD_AT - 1 C-STOREs and holds this one unanswered.
HOLD_AT = 4
KILLED = "<kill>"


class HoldingPacs:
    """A pynetdicom Storage SCP that logs every C-STORE (calling AE title, SOP Instance
    UID) in arrival order, and holds the ``hold_at``-th one unanswered until released: the
    sender that sent it is then mid-send, for as long as the test needs."""

    def __init__(self, hold_at: int) -> None:
        self.ae_title = "PACS"
        self.port = free_port()
        self.log: list[tuple[str, str]] = []
        self.holding = threading.Event()
        self.release = threading.Event()
        self._hold_at = hold_at
        self._lock = threading.Lock()
        self._server: object = None

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.log.append((event.assoc.requestor.ae_title.strip(),
                             str(event.dataset.SOPInstanceUID)))
            hold = len(self.log) == self._hold_at
        if hold:
            self.holding.set()
            self.release.wait(300)  # the test releases it once the sender is dead
        return 0x0000

    def mark(self, label: str) -> None:
        """A line in the log between two C-STOREs (what happened then)."""
        with self._lock:
            self.log.append((label, ""))

    def start(self) -> HoldingPacs:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]


def _queue_outputs(session: Session, files: list[Path], pacs: HoldingPacs) -> list[str]:
    """Outbox rows for ``files`` as a worker leaves them: one pending entry per instance
    for the destination ``pacs``. Returns the SOP Instance UIDs in send order."""
    headers = [dcmread(path, stop_before_pixels=True) for path in files]
    series = Series(series_uid=str(headers[0].SeriesInstanceUID),
                    study_uid=str(headers[0].StudyInstanceUID), state="done")
    session.add(series)
    session.flush()
    job = Job(series_id=series.id, series_version=1, state=JobState.DONE)
    session.add(job)
    session.flush()
    for path, ds in zip(files, headers, strict=True):
        output = OutputInstance(sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                                series_uid=str(ds.SeriesInstanceUID), kind="sc",
                                source_series_id=series.id, series_version=1, job_id=job.id,
                                path=str(path))
        session.add(output)
        session.flush()
        session.add(OutboxEntry(output_id=output.id, destination="pacs",
                                ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port))
    session.commit()
    return [str(ds.SOPInstanceUID) for ds in headers]


def _sender_config(tmp_path: Path, name: str, port: int, url: str, weights: Path,
                   pacs: HoldingPacs) -> Path:
    """A sender's config: its own calling AE title (the PACS tells the senders apart by
    it), a lease of 15 s renewed every 0.5 s (a busy CI machine's stall cannot outlast it),
    one association, a DIMSE timeout longer than
    the test holds a C-STORE (the sender must not give up on it by itself)."""
    toml = subprocess_node_toml(tmp_path / "shared", port, weights, "STORESCU", pacs.ae_title,
                                pacs.port)
    toml = toml.replace('ae_title = "DICOMNODE"', f'ae_title = "{name}"', 1)
    toml = toml.replace("[node]\n", f'[node]\ndatabase_url = "{url}"\n'
                        "heartbeat_interval_s = 0.5\n", 1)
    toml = toml.replace("[outbox]\n", "[outbox]\nlease_s = 15.0\nassociations_per_destination = 1\n"
                        "dimse_timeout_s = 120.0\n", 1)
    path = tmp_path / f"{name}.toml"
    path.write_text(toml)
    return path


@pytest.mark.postgres
def test_a_sender_killed_mid_send_is_taken_over_and_nothing_confirmed_is_sent_again(
        tmp_path: Path, test_weights: Path, postgres_url: str) -> None:
    pacs = HoldingPacs(HOLD_AT).start()
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    files = write_series(tmp_path / "outputs", SeriesSpec(n_slices=INSTANCES), seed=7)
    with sessions() as session:
        sops = _queue_outputs(session, files, pacs)
    ports = {"SENDERA": free_port(), "SENDERB": free_port()}
    nodes = {name: f"/sender:{port}" for name, port in ports.items()}  # heartbeat name tails
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(name: str) -> subprocess.Popen[bytes]:
        config = _sender_config(tmp_path, name, ports[name], postgres_url, test_weights, pacs)
        return subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--role",
                                 "sender", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def count(*where: ColumnElement[bool]) -> int:
        with sessions() as session:
            return int(session.scalar(select(func.count()).select_from(OutboxEntry)
                                      .where(*where)) or 0)

    def beat(name: str) -> object:
        with sessions() as session:
            return session.scalar(select(NodeHeartbeat.beat_at).where(
                NodeHeartbeat.node.endswith(nodes[name])))

    a = start("SENDERA")
    b: subprocess.Popen[bytes] | None = None
    try:
        assert wait_for(pacs.holding.is_set, 120), "sender A never reached the held C-STORE"
        # A is mid-send: what the PACS answered is confirmed (committed sent), the rest is
        # still claimed by A under a lease its heartbeat renews.
        assert wait_for(lambda: count(OutboxEntry.state == OutboxState.SENT) == HOLD_AT - 1, 60)
        assert count(OutboxEntry.state == OutboxState.PENDING,
                     OutboxEntry.claimed_by.endswith(nodes["SENDERA"]),
                     OutboxEntry.lease_until.is_not(None)) == INSTANCES - HOLD_AT + 1
        b = start("SENDERB")
        # B runs (and polls the outbox every 0.2 s) while A holds its claims: two beats.
        assert wait_for(lambda: beat("SENDERB") is not None, 60)
        first = beat("SENDERB")
        assert wait_for(lambda: beat("SENDERB") != first, 60)
        pacs.mark(KILLED)
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        with sessions() as session:
            confirmed = set(session.scalars(
                select(OutputInstance.sop_uid).join(OutboxEntry,
                                                    OutboxEntry.output_id == OutputInstance.id)
                .where(OutboxEntry.state == OutboxState.SENT)))
        pacs.release.set()  # the held C-STORE is answered, to a dead sender
        assert wait_for(lambda: count(OutboxEntry.state != OutboxState.SENT) == 0, 180), \
            "B did not send what A had claimed"
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        if b is not None:
            b.terminate()
            b.wait(timeout=60)
        pacs.stop()
    assert b.returncode == 0, b.stderr.read() if b.stderr else ""

    kill = pacs.log.index((KILLED, ""))
    before, after = pacs.log[:kill], pacs.log[kill + 1:]
    assert {ae for ae, _sop in before} == {"SENDERA"}  # B sent nothing while A held claims
    assert {ae for ae, _sop in after} == {"SENDERB"}
    held = before[HOLD_AT - 1][1]
    assert confirmed == {sop for _ae, sop in before[:HOLD_AT - 1]} and held not in confirmed
    received = Counter(sop for _ae, sop in before + after)
    assert set(received) == set(sops)  # every instance arrived
    assert all(received[sop] == 1 for sop in confirmed)  # confirmed: never sent again
    assert {sop for sop, n in received.items() if n > 1} == {held}  # only the unconfirmed
    assert received[held] == 2

    with sessions() as session:
        claimed = dict(session.execute(
            select(OutputInstance.sop_uid, OutboxEntry.claimed_by)
            .join(OutboxEntry, OutboxEntry.output_id == OutputInstance.id)).all())
        sent_events = session.execute(select(AuditEvent.sop_uid, AuditEvent.node).where(
            AuditEvent.kind == "send.attempt", AuditEvent.outcome == "ok")).all()
    sender_of = {sop: "SENDERA" if sop in confirmed else "SENDERB" for sop in sops}
    assert {sop: by.rsplit("/", 1)[-1] for sop, by in claimed.items()} == {
        sop: nodes[name].lstrip("/") for sop, name in sender_of.items()}
    assert Counter(sop for sop, _node in sent_events) == Counter(sops)  # one each
    assert {sop: node.rsplit("/", 1)[-1] for sop, node in sent_events} == {
        sop: nodes[name].lstrip("/") for sop, name in sender_of.items()}
    verify = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "audit", "--verify", "--config",
         str(tmp_path / "SENDERB.toml")], capture_output=True, text=True, env=env,
        timeout=120, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    engine.dispose()
