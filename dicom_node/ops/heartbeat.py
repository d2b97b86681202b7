"""The running node's heartbeat: one row in ``node_heartbeats`` per node.

``dicom-node serve`` writes it (:class:`HeartbeatWriter`, a thread of its own) at start,
every ``node.heartbeat_interval_s`` while it runs, when it starts stopping and once it
has stopped: its process id and host, the package version, the model, the device it
actually uses (from the loaded predictor, not the config's ``auto``), whether it is
healthy and the running job's stage (:class:`JobStages`). ``dicom-node status``
(:mod:`dicom_node.ops.status`) reads it: a node whose row says stopped, whose process is
gone, or whose last beat is older than :func:`stale_after_s` is not running.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from storage.models import NodeHeartbeat, NodeState, utcnow

log = logging.getLogger(__name__)

#: The job stage (a label of :mod:`dicom_node.jobs`' timing hook) that writes one SC slice.
_SC_SLICE_STAGE = "SC: atomic_write"
#: The stage each job starts with: the slice count starts again there.
_FIRST_STAGE = "select_series"


def node_name(host: str, port: int) -> str:
    """The heartbeat row's key: the node's host and its main DICOM port."""
    return f"{host}:{port}"


def node_host(role: str) -> str:
    """The heartbeat's host: the machine's name, with the role unless it is ``all`` (a
    worker and a receiver on one machine and config are two rows)."""
    host = socket.gethostname()
    return host if role == "all" else f"{host}/{role}"


def admin_node() -> str:
    """The node an admin command (``dicom-node outbox retry``, ``discard``, ...) writes
    its audit events as: the machine's name and ``/cli`` (the OS user is in the event)."""
    return f"{socket.gethostname()}/cli"


def stale_after_s(interval_s: float) -> float:
    """A beat older than this means the node is not running: three missed beats (a busy
    database may hold one back) and 2 s to spare."""
    return 3.0 * interval_s + 2.0


@dataclass(frozen=True)
class NodeIdentity:
    """What the heartbeat says about the process (fixed while it runs)."""

    host: str
    port: int
    pid: int
    version: str
    model: str
    model_sha256: str
    device: str
    listening: str


class JobStages:
    """The running job's stage, as :func:`dicom_node.jobs.run_series` names it through its
    timing hook (``NodeContext.timing``): the innermost stage running, else the last one,
    with the SC slices written so far. Set from the job's thread, read by the heartbeat's."""

    def __init__(self) -> None:
        self._stack: list[str] = []
        self._last = ""
        self._sc_slices = 0

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        name = stage.split(" (")[0]
        if name == _FIRST_STAGE:
            self._sc_slices = 0
        self._stack.append(name)
        self._last = name
        try:
            yield
        finally:
            self._stack.pop()
            if name == _SC_SLICE_STAGE:
                self._sc_slices += 1

    @property
    def current(self) -> str:
        stage = self._stack[-1] if self._stack else self._last
        return f"{stage}; {self._sc_slices} SC slices written" if self._sc_slices else stage


class HeartbeatWriter:
    """Writes the node's heartbeat row from a thread of its own."""

    def __init__(self, sessions: sessionmaker[Session], identity: NodeIdentity, interval_s: float,
                 healthy: Callable[[], bool], job_stage: Callable[[], str],
                 on_beat: Callable[[], object] | None = None) -> None:
        """``on_beat``: run after each beat of a process that still owns its row (the
        node renews the leases of the work it holds there)."""
        self._on_beat = on_beat
        self._sessions = sessions
        self._identity = identity
        self._interval_s = interval_s
        self._healthy = healthy
        self._job_stage = job_stage
        self._state = NodeState.RUNNING
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._failing = False

    @property
    def name(self) -> str:
        return node_name(self._identity.host, self._identity.port)

    def start(self) -> None:
        """The first beat (a new row: this process, started now), then one per interval."""
        now = utcnow()
        me = self._identity
        with self._sessions() as session:
            session.merge(NodeHeartbeat(
                node=self.name, host=me.host, pid=me.pid, state=NodeState.RUNNING,
                version=me.version, model=me.model, model_sha256=me.model_sha256,
                device=me.device, listening=me.listening, healthy=True, job_stage="",
                interval_s=self._interval_s, started_at=now, beat_at=now))
            session.commit()
        self._thread.start()

    def stopping(self) -> None:
        """Say so at once (the running job may take a while to finish)."""
        self._state = NodeState.STOPPING
        self._beat_guarded()

    def stop(self) -> None:
        """The last beat: stopped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._state = NodeState.STOPPED
        self._beat_guarded()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._beat_guarded()

    def _beat_guarded(self) -> None:
        try:
            self._beat()
        except Exception as exc:  # thread boundary: a missed beat shows as a stale one
            if not self._failing:
                log.warning("heartbeat not written (dicom-node status will call the node "
                            "down if this goes on): %s: %s", type(exc).__name__, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("heartbeat written again")
            self._failing = False

    def _beat(self) -> None:
        with self._sessions() as session:
            row = session.get(NodeHeartbeat, self.name)
            if row is None or row.pid != self._identity.pid:
                return  # another process took the name over (a second node, same port)
            row.beat_at = utcnow()
            row.state = self._state
            row.healthy = self._healthy()
            row.job_stage = self._job_stage()[:128]
            session.commit()
        if self._on_beat is not None and self._state != NodeState.STOPPED:
            self._on_beat()  # also while stopping: the running job is being finished
