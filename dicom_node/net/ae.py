"""The node's AEs and associations, set up one way for the receiver (SCP), the sender
and C-ECHO (SCU): its identity and timeouts, TCP_NODELAY, and the one workaround that
reaches into pynetdicom's internals (:func:`keep_responses`)."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.net.identity import apply_identity
from dicom_node.net.tls import TlsConfig, client_tls_args


def new_ae(ae_title: str, *, acse_timeout_s: float, dimse_timeout_s: float,
           network_timeout_s: float) -> AE:
    """An AE that says who the node is (:mod:`dicom_node.net.identity`), with its timeouts."""
    ae = AE(ae_title=ae_title)
    apply_identity(ae)
    ae.acse_timeout = acse_timeout_s
    ae.dimse_timeout = dimse_timeout_s
    ae.network_timeout = network_timeout_s
    return ae


def echo(calling_ae_title: str, ae_title: str, host: str, port: int,
         tls: TlsConfig | None = None, timeout_s: float = 10) -> bool:
    """C-ECHO ``ae_title@host:port`` (over TLS when given); True on status 0x0000."""
    ae = new_ae(calling_ae_title, acse_timeout_s=timeout_s, dimse_timeout_s=timeout_s,
                network_timeout_s=timeout_s)
    ae.add_requested_context(Verification)
    tls_args = client_tls_args(tls, host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return "Status" in status and int(status.Status) == 0


def answers_dicom(calling_ae_title: str, ae_title: str, host: str, port: int,
                  timeout_s: float = 5) -> bool:
    """Does a DICOM SCP answer an association request at ``host:port`` (accepting or
    rejecting it)? Released at once if accepted."""
    ae = new_ae(calling_ae_title, acse_timeout_s=timeout_s, dimse_timeout_s=timeout_s,
                network_timeout_s=timeout_s)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if assoc.is_established:
        assoc.release()
        return True
    return bool(assoc.is_rejected)


def set_nodelay(assoc: Association) -> None:
    """pynetdicom leaves Nagle on; small PDUs then wait for delayed ACKs."""
    sock = assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bound_blocking_io(assoc: Association, timeout_s: float) -> None:
    """pynetdicom leaves an association's socket blocking without a timeout: a peer that
    stops in the middle of a PDU holds its reading thread (which is not a daemon) for
    ever, so the process cannot exit. A read or write now fails after ``timeout_s``
    without progress, and the association is aborted as for any broken connection."""
    sock = assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.settimeout(timeout_s)


def end_associations(associations: list[Association], join_timeout_s: float) -> int:
    """Abort ``associations`` now; returns how many still have a live reading thread
    (which, not being a daemon, would keep the process from exiting) after
    ``join_timeout_s``.

    An established association gets an A-ABORT (``abort(block=False)``: blocking waits
    for the state machine to reach idle, which a thread stuck in a read never lets it
    do), sent where its connection still works. Whatever is still alive after half the
    time, and every connection not yet established, is ended without one: its socket
    shut (which ends a blocked read or write) and its reading thread told to end."""
    established = [a for a in associations if a.is_established]
    for assoc in established:
        assoc.abort(block=False)
    deadline = time.monotonic() + join_timeout_s
    _join(established, time.monotonic() + join_timeout_s / 2.0)
    for assoc in associations:
        if assoc.dul.ident is not None and not assoc.dul.is_alive():
            continue  # ended
        sock = assoc.dul.socket
        raw = sock.socket if sock is not None else None  # the DUL may clear it meanwhile
        if raw is not None:
            with contextlib.suppress(OSError):  # already closed by the peer
                raw.shutdown(socket.SHUT_RDWR)
        assoc.dul.kill_dul()  # a reading thread not started yet ends at its first turn
    _join(associations, deadline)
    return sum(1 for a in associations if a.dul.is_alive())


def _join(associations: list[Association], deadline: float) -> None:
    """The reading threads, then the associations' own (where a C-STORE handler may
    still be storing an instance)."""
    for assoc in associations:
        if assoc.dul.ident is not None:  # started
            assoc.dul.join(max(0.0, deadline - time.monotonic()))
    for assoc in associations:
        if assoc.ident is not None:
            assoc.join(max(0.0, deadline - time.monotonic()))


# How often one response may go back on the queue before it is dropped as pynetdicom
# would (only a response that no request waits for anymore comes round that often).
_REQUEUE_LIMIT = 1000


def keep_responses(assoc: Association) -> None:
    """Give a response that pynetdicom's reactor took by mistake back to the request.

    pynetdicom 3.0's association reactor and ``send_c_store`` hand the DIMSE message
    queue over with a check-then-act flag (``_is_paused``): if the reactor thread is
    preempted between passing its checkpoint and clearing that flag, ``send_c_store``
    believes it paused, sends, and the reactor then takes the C-STORE response off the
    queue, logs "Received unexpected C-STORE service message" and drops it; the request
    waits out the DIMSE timeout and the association aborts (DESIGN.md: about 1 in 190
    runs). Other busy threads in the process (a job writing while the sender streams)
    make the preemption likelier. The node's SCU associations receive nothing but
    responses to their own requests, so a response the reactor takes goes back on the
    queue, where the waiting ``send_c_store`` gets it.
    """
    serve = assoc._serve_request
    requeued: dict[int, int] = {}

    def serve_or_requeue(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and requeued.get(id(msg), 0) < _REQUEUE_LIMIT:
            requeued[id(msg)] = requeued.get(id(msg), 0) + 1
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        requeued.pop(id(msg), None)
        serve(msg, context_id)

    assoc._serve_request = serve_or_requeue  # type: ignore[method-assign]


#: pynetdicom's own ERROR lines for a connection that could not be made: the sender logs
#: one line per destination and pass with the real reason instead ("connection refused",
#: "does not resolve", ...; :meth:`dicom_node.outbox.sender.Sender._association_failure`).
_CONNECT_ERRORS = ("Association request failed", "TCP Initialisation Error")


class _UnnamedConnectErrors(logging.Filter):
    """Drops pynetdicom's anonymous connection-failure ERRORs unless pynetdicom logs at
    DEBUG (``dicom-node -v``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            return True
        return not str(record.msg).startswith(_CONNECT_ERRORS)


def quiet_unnamed_connect_errors() -> None:
    """Install the filter on pynetdicom's transport logger (idempotent)."""
    transport = logging.getLogger("pynetdicom.transport")
    if not any(isinstance(f, _UnnamedConnectErrors) for f in transport.filters):
        transport.addFilter(_UnnamedConnectErrors())
