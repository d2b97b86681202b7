"""``dicom-node``: serve, receive, echo, audit, status, outbox, reprocess, discard,
check-config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from dicom_node.config import ROLES, NodeConfig, default_config_path, load_config, with_data_dir
from dicom_node.errors import ConfigError, RequestRefused, WeightsError
from dicom_node.net.host_checks import bind_problem, connect_failure, is_ip_address, resolve
from dicom_node.net.tls import TlsConfig

log = logging.getLogger("dicom_node")


def _load(args: argparse.Namespace) -> NodeConfig:
    path = Path(args.config) if args.config else default_config_path()
    config = load_config(path)
    if getattr(args, "data_dir", None):
        config = with_data_dir(config, Path(args.data_dir).resolve())
    return config


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def stop_child_node(node: subprocess.Popen[Any], timeout_s: float = 60.0) -> None:
    """Stop a ``dicom-node serve`` (or ``receive``) run as a child process, as systemd
    would: SIGTERM (:func:`_stop_on_signals` turns it into an orderly stop), then, past
    ``timeout_s``, SIGKILL. For the demo and the benchmarks that start the node."""
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()


def cmd_receive(args: argparse.Namespace) -> int:
    from dicom_node.ingest.receive_process import ReceiveOnlyNode
    from dicom_node.ops.heartbeat import node_host, node_name
    from dicom_node.ops.systemd_notify import Notifier

    config = resolve_peer_addresses(_load(args))
    if args.port == config.receiver.port:
        print(f"dicom-node receive: --port must differ from receiver.port ({args.port}), "
              "where 'dicom-node serve' listens", file=sys.stderr)
        return 2
    problem = bind_problem(config.receiver.bind_address, args.port)
    if problem is not None:
        print(f"dicom-node receive: cannot start: --port with receiver.bind_address "
              f"({config.receiver.bind_address}:{args.port}): {problem}", file=sys.stderr)
        return 2
    node = ReceiveOnlyNode(config, args.port,
                           node_id=node_name(node_host("receive-only"), args.port))
    stop = _stop_on_signals()
    notifier = Notifier.from_environment()
    node.start()
    notifier.ready(f"receive-only, listening as {config.receiver.ae_title} on "
                   f"{config.receiver.bind_address}:{node.receiver.port}")
    print(f"dicom-node receive-only listening as {config.receiver.ae_title} on "
          f"{config.receiver.bind_address}:{node.receiver.port}", flush=True)
    while not stop.wait(timeout=0.5):  # wake now and then: see cmd_serve
        notifier.watchdog()
    notifier.stopping("stopping: recording what was received")
    node.stop()
    return 0


def _serve_receiver(config: NodeConfig) -> int:
    """``serve --role receiver``: the Storage SCP and its recorder on receiver.port, with
    a heartbeat; no model, no torch."""
    from dicom_node.ingest.receive_process import ReceiveOnlyNode
    from dicom_node.ops.build_info import package_version
    from dicom_node.ops.heartbeat import HeartbeatWriter, NodeIdentity, node_host, node_name
    from dicom_node.ops.systemd_notify import Notifier

    node = ReceiveOnlyNode(config, config.receiver.port, role="receiver",
                           node_id=node_name(node_host("receiver"), config.receiver.port))
    stop = _stop_on_signals()
    notifier = Notifier.from_environment()
    node.start()
    listening = (f"{config.receiver.ae_title}@{config.receiver.bind_address}:"
                 f"{node.receiver.port}")
    heartbeat = HeartbeatWriter(
        node.sessions,
        NodeIdentity(host=node_host("receiver"), port=config.receiver.port,
                     pid=os.getpid(), version=package_version(), model="", model_sha256="",
                     device="", listening=listening),
        config.heartbeat_interval_s, lambda: node.receiver.is_listening, lambda: "")
    heartbeat.start()
    notifier.ready(f"receiver, listening as {listening}")
    print(f"dicom-node receiver listening as {listening}", flush=True)
    while not stop.wait(timeout=0.5):  # wake now and then: see cmd_serve
        notifier.watchdog()
    notifier.stopping("stopping: recording what was received")
    heartbeat.stopping()
    node.stop()
    heartbeat.stop()
    return 0


def _serve_sender(config: NodeConfig) -> int:
    """``serve --role sender``: the outbox and the notifications; no receiver, no model."""
    from dicom_node.ops.systemd_notify import Notifier
    from dicom_node.send_service import SendOnlyNode

    node = SendOnlyNode(config)
    stop = _stop_on_signals()
    notifier = Notifier.from_environment()
    node.start(heartbeat=notifier.watchdog)
    notifier.ready("sender: draining the outbox")
    print("dicom-node sender: draining the outbox", flush=True)
    while not stop.wait(timeout=0.5):
        pass
    notifier.stopping("stopping: finishing the sends in flight")
    node.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = resolve_peer_addresses(_load(args))
    if args.role is not None:
        config = replace(config, role=args.role)
    problems = listen_problems(config)
    if problems:
        for problem in problems:
            print(f"dicom-node: cannot start: {problem}", file=sys.stderr)
        return 2
    if config.role == "receiver":
        return _serve_receiver(config)
    if config.role == "sender":
        return _serve_sender(config)
    # Only now: the model's modules import torch, which the two roles above never load.
    from dicom_node.analysis.process import AnalysisProcessError
    from dicom_node.ops.systemd_notify import Notifier
    from dicom_node.service import Node

    try:
        node = Node(config)
    except WeightsError as exc:
        print(f"dicom-node: cannot start: {exc}\n"
              f"  model.weights_path in {config.source_path} must name a dicom-node generator "
              "weights file; the shipped demo model is dicom_node/models/demo-generator.pt "
              "('make demo-model' rebuilds it).",
              file=sys.stderr)
        return 2
    stop = _stop_on_signals()
    notifier = Notifier.from_environment()
    try:
        node.start(heartbeat=notifier.watchdog)
    except AnalysisProcessError as exc:
        print(f"dicom-node: cannot start: {exc}\n  the TBR analysis process (python -m "
              "dicom_node.analysis.process) printed its error above; set "
              "analysis.separate_process = false to run the analysis in the node itself.",
              file=sys.stderr)
        return 2
    except OSError as exc:  # a port taken between the check above and the bind
        print(f"dicom-node: cannot start: cannot listen: {exc.strerror or exc} (check "
              "receiver.bind_address, receiver.port, receiver.extra_ports, metrics.port)",
              file=sys.stderr)
        return 2
    notifier.ready(f"listening as {config.receiver.ae_title} on "
                   f"{config.receiver.bind_address}:{node.receiver.port}, model "
                   f"{node.ctx.predictor.model.card.name} on {node.ctx.predictor.device}")
    print(f"dicom-node listening as {config.receiver.ae_title} on "
          f"{config.receiver.bind_address}:{node.receiver.port} "
          f"(model {node.ctx.predictor.model.card.name}, device {node.ctx.predictor.device})",
          flush=True)
    # Wake now and then: a signal delivered to another thread only runs its Python
    # handler once the main thread executes bytecode again.
    while not stop.wait(timeout=0.5):
        pass
    notifier.stopping("stopping: finishing the running job")
    node.stop()
    return 0


def _quiet_network_errors(args: argparse.Namespace) -> None:
    """The command prints each failed association with its reason: pynetdicom's own ERROR
    lines about it would say the same twice (-v shows them)."""
    if not args.verbose:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def _echo_failure(host: str, port: int) -> str:
    """Why a C-ECHO failed, in a few words (after the fact: the connection tried alone)."""
    return connect_failure(host, port, 5.0) or "association rejected or aborted (AE titles?)"


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO ``--host``, or the fixed destinations and the return addresses of the
    peers (where ``return_to_sender`` results go); never the node itself."""
    from dicom_node.net.ae import echo

    _quiet_network_errors(args)
    config = _load(args)
    targets: list[tuple[str, str, int, TlsConfig | None]]
    failures = 0
    if args.host:
        targets = [(args.ae_title or "ANY-SCP", args.host, args.port, None)]
    else:
        targets = []
        for dest in config.destinations:
            if dest.is_dicomweb:  # no C-ECHO over HTTP: the QIDO-RS check instead
                failures += not _check_dicomweb(dest, "")
                continue
            if not dest.return_to_sender:
                targets.append((dest.ae_title, dest.host, dest.port, dest.tls))
                continue
            targets += [(p.ae_title, p.return_host, p.return_port, dest.tls) for p in config.peers
                        if p.return_host is not None and p.return_port is not None]
        targets = list(dict.fromkeys(targets))  # the same peer once
        itself = [t for t in targets if t[0] == config.receiver.ae_title
                  and t[2] == config.receiver.port]
        for ae_title, host, port, _tls in itself:
            print(f"not echoing {ae_title}@{host}:{port}: that is this node itself")
        targets = [t for t in targets if t not in itself]
        if not targets:
            if failures or any(d.is_dicomweb for d in config.destinations):
                return 1 if failures else 0
            print("nothing to echo: the config has no fixed destination ([[destinations]] "
                  "with ae_title/host/port) and no peer with a return address "
                  "(peers.return_host/return_port) for return_to_sender; "
                  "use --host/--port/--ae-title to echo one peer")
            return 0
    for ae_title, host, port, tls in targets:
        ok = echo(config.receiver.ae_title, ae_title, host, port, tls)
        print(f"C-ECHO {ae_title}@{host}:{port}: "
              f"{'ok' if ok else 'FAILED: ' + _echo_failure(host, port)}")
        failures += not ok
    return 1 if failures else 0


def _check_dicomweb(dest: Any, prefix: str) -> bool:
    """Print whether a DICOMweb destination answers a QIDO-RS search with its credentials."""
    from dicom_node.outbox.stow import check_service

    problem = check_service(dest)
    print(f"{prefix}DICOMweb {dest.url} (QIDO-RS search): "
          f"{'ok' if problem is None else 'FAILED: ' + problem}")
    return problem is None


def _engine(config: NodeConfig) -> Any:
    from storage.database import make_engine, make_session_factory
    return make_session_factory(make_engine(config.database_url))


def _operator() -> str:
    """Who runs this admin command, for the audit: the OS user, and under sudo who
    called sudo."""
    import getpass
    import os

    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (containers)
        user = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


def _when(at: datetime) -> str:
    from storage.models import as_utc

    return f"{as_utc(at):%Y-%m-%d %H:%M:%S}"


#: With collapsing, this many raw events per listed line are read at most.
AUDIT_EVENTS_PER_LINE = 200


def cmd_audit(args: argparse.Namespace) -> int:
    from dicom_node.series.lookup import (
        accession_numbers,
        resolve_series_uid,
        resolve_study_uid,
        with_outputs,
    )
    from storage.audit import collapse_events, recent_events, verify_chain

    sessions = _engine(_load(args))
    with sessions() as session:
        if args.verify:
            check = verify_chain(session)
            if check.ok:
                print(f"audit chain intact: {check.events} events")
                return 0
            print(f"audit chain BROKEN at event id {check.first_broken_id}: {check.reason}")
            return 1
        study = resolve_study_uid(session, args.study, audited=True) if args.study else None
        series = (with_outputs(session, resolve_series_uid(session, args.series, outputs=True,
                                                           audited=True))
                  if args.series else None)
        collapse = not (args.all or args.json)
        events = recent_events(session, limit=args.limit * (AUDIT_EVENTS_PER_LINE if collapse
                                                             else 1),
                               study_uid=study, series_uids=series, kind=args.kind)
        accession = accession_numbers(session, {e.series_uid for e in events} - {""})
        if args.json:
            for event in events:
                print(json.dumps({"id": event.id, "at": event.at.isoformat(),
                                  "kind": event.kind, "outcome": event.outcome,
                                  "study_uid": event.study_uid, "series_uid": event.series_uid,
                                  "sop_uid": event.sop_uid, "peer": event.peer,
                                  "node": event.node,
                                  "accession_number": accession.get(event.series_uid, ""),
                                  "detail": event.detail}))
            return 0
    groups = collapse_events(events)[-args.limit:] if collapse else [
        _single(event) for event in events]
    if not groups:
        print("0 events")
        return 0
    print(f"{'time (UTC)':19} {'outcome':7} {'kind':20} {'node (tail)':24} {'peer':28} "
          f"{'accession':16} {'series (UID tail)':24} detail")
    for group in groups:
        event = group.first
        where = event.series_uid or event.study_uid or ""
        times = ""
        if group.count > 1:
            times = f"[{group.count} events to {_when(group.last_at)[11:]}] "
        # the node's tail: its role and port tell apart nodes on one machine
        node = event.node[-24:] or "-"  # "-": written before events named their node
        print(f"{_when(event.at)} {event.outcome:7} {event.kind:20} {node:24} "
              f"{event.peer:28.28} {accession.get(event.series_uid, '-'):16} "
              f"{where[-24:]:24} {times}{group.detail}")
    return 0


def _single(event: Any) -> Any:
    from storage.audit import EventGroup

    return EventGroup(event, event.at, 1, event.detail)


def cmd_status(args: argparse.Namespace) -> int:
    """Whether the node runs and what it is doing; exit 0 running, 1 running but
    unhealthy, 3 not running (as an init script's ``status``)."""
    from dicom_node.ops.status import format_status, node_status, status_exit_code

    config = _load(args)
    report = node_status(config, _engine(config))
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return status_exit_code(report)


def _listen_checks(config: NodeConfig) -> list[tuple[str, str, int]]:
    """(config keys, address, port) of every socket ``serve`` listens on."""
    rc = config.receiver
    checks = []
    if config.role in ("all", "receiver"):
        checks.append(("receiver.bind_address/receiver.port", rc.bind_address, rc.port))
    if config.role == "all":
        checks += [(f"receiver.extra_ports[{i}]", rc.bind_address, port)
                   for i, port in enumerate(rc.extra_ports)]
    if config.metrics.enabled and config.role in ("all", "worker"):
        checks.append(("metrics.bind_address/metrics.port", config.metrics.bind_address,
                       config.metrics.port))
    return checks


def listen_problems(config: NodeConfig) -> list[str]:
    """What would stop ``serve`` from listening, one line per socket, naming the key."""
    problems = []
    for key, address, port in _listen_checks(config):
        problem = bind_problem(address, port)
        if problem is not None:
            problems.append(f"{key} ({address}:{port}): {problem}")
    return problems


def resolve_peer_addresses(config: NodeConfig) -> NodeConfig:
    """The config with host names in ``peers.addresses`` replaced by the IP addresses they
    resolve to now (the receiver compares the caller's IP address with the list; a host
    name there would never match). A name that does not resolve is a ConfigError naming
    the key: the node does not start with an allow-list it cannot apply."""
    peers = []
    for i, peer in enumerate(config.peers):
        addresses: list[str] = []
        for j, entry in enumerate(peer.addresses):
            found, problem = resolve(entry)
            if problem is not None:
                raise ConfigError(f"peers[{i}].addresses[{j}] ({peer.ae_title}): {problem}; "
                                  "give an IP address or a name this host resolves")
            addresses += [a for a in found if a not in addresses]
        peers.append(replace(peer, addresses=tuple(addresses)))
    return replace(config, peers=tuple(peers))


def _running_since(config: NodeConfig) -> str | None:
    """When the node on this database started, if it looks to be running now: its last
    ``node.start`` (not a receive-only process's) has no ``node.stop`` after it, and a
    DICOM SCP answers on ``receiver.port`` (an association accepted or rejected: the
    node rejects calling AE titles it does not know, its own among them)."""
    from sqlalchemy import select

    from dicom_node.net.ae import answers_dicom
    from storage.audit import AuditKind
    from storage.models import AuditEvent

    with _engine(config)() as session:
        last = session.scalars(select(AuditEvent).where(
            AuditEvent.kind.in_((AuditKind.NODE_START, AuditKind.NODE_STOP)),
            ~AuditEvent.detail.contains('"role": "receive-only"'))
            .order_by(AuditEvent.id.desc()).limit(1)).first()
    if last is None or last.kind != AuditKind.NODE_START:
        return None
    address = config.receiver.bind_address
    host = "127.0.0.1" if address in ("0.0.0.0", "") else "::1" if address == "::" else address
    if not answers_dicom(config.receiver.ae_title, config.receiver.ae_title, host,
                         config.receiver.port):
        return None
    return _when(last.at)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config (loading it is the validation), the model, what this host says
    about the addresses (ports free, bind address local, host names resolving), and
    C-ECHO every destination. Every line names the config key it is about."""
    from dicom_node.inference.model_weights import load_weights
    from dicom_node.net.ae import echo

    _quiet_network_errors(args)
    config = _load(args)
    print(f"config {config.source_path}: valid")
    failures = 0
    try:
        model = load_weights(config.model.weights_path)
        print(f"model.weights_path: {model.card.name} {model.card.version} "
              f"sha256 {model.sha256[:16]}...: ok")
    except WeightsError as exc:
        print(f"model.weights_path: FAILED: {exc}")
        failures += 1
    for key, address, port in _listen_checks(config):
        problem = bind_problem(address, port)
        if problem is None:
            print(f"{key} {address}:{port}: free to listen on: ok")
            continue
        running = (_running_since(config) if key.startswith("receiver.bind_address")
                   and "in use" in problem else None)
        if running is not None:
            print(f"{key} {address}:{port}: in use by this node (started {running} UTC by "
                  "its audit log, and a DICOM SCP answers there): fine for a restart; a "
                  "second 'serve' beside it would fail")
            continue
        print(f"{key} {address}:{port}: FAILED: {problem}")
        failures += 1
    for i, peer in enumerate(config.peers):
        for j, entry in enumerate(peer.addresses):
            if is_ip_address(entry):
                continue
            found, problem = resolve(entry)
            if problem is None:
                print(f"peers[{i}].addresses[{j}] ({peer.ae_title}) {entry}: resolves to "
                      f"{', '.join(found)}: ok (resolved once at start)")
            else:
                print(f"peers[{i}].addresses[{j}] ({peer.ae_title}): FAILED: {problem}; "
                      "serve refuses to start with it")
                failures += 1
        if peer.return_host is not None and resolve(peer.return_host)[1] is not None:
            print(f"peers[{i}].return_host ({peer.ae_title}): FAILED: "
                  f"{resolve(peer.return_host)[1]}")
            failures += 1
    for i, dest in enumerate(config.destinations):
        key = f"destinations[{i}] ({dest.name})"
        if dest.is_dicomweb:
            failures += not _check_dicomweb(dest, f"{key}: ")
            continue
        if dest.return_to_sender:
            routes = [(p.ae_title, p.return_host, p.return_port) for p in config.peers
                      if p.return_host and p.return_port]
            print(f"{key}: return to sender ({len(routes)} return route(s) in "
                  "peers.return_host/return_port)")
            targets = [(ae, host, port, dest.tls) for ae, host, port in routes
                       if host is not None and port is not None]
        else:
            problem = resolve(dest.host)[1]
            if problem is not None:
                print(f"{key}.host: FAILED: {problem}")
                failures += 1
                continue
            print(f"{key}:")
            targets = [(dest.ae_title, dest.host, dest.port, dest.tls)]
        for ae_title, host, port, tls in targets:
            ok = echo(config.receiver.ae_title, ae_title, host, port, tls)
            print(f"  C-ECHO {ae_title}@{host}:{port}: "
                  f"{'ok' if ok else 'FAILED: ' + _echo_failure(host, port)}")
            failures += not ok
    return 1 if failures else 0


def cmd_outbox(args: argparse.Namespace) -> int:
    from dicom_node.ops.heartbeat import admin_node
    from dicom_node.outbox.admin import (
        count_entries,
        list_entries,
        list_series,
        next_retry_text,
        retry_dead,
    )
    from dicom_node.series.lookup import resolve_series_uid, resolve_study_uid
    from storage.audit import AuditLog

    sessions = _engine(_load(args))
    if args.action == "retry":
        audit = AuditLog(sessions, node=admin_node())
        with audit.transaction() as session:
            count = retry_dead(session, audit, destination=args.destination,
                               requested_by=_operator())
        print(f"re-queued {count} dead letter(s)")
        return 0
    with sessions() as session:
        series = ({resolve_series_uid(session, args.series, outputs=True)} if args.series
                  else None)
        study = resolve_study_uid(session, args.study) if args.study else None
        lister = list_entries if args.all else list_series
        rows = lister(session, state=args.state, destination=args.destination,
                      limit=args.limit, series_uids=series, study_uid=study)
        entries = count_entries(session, state=args.state, destination=args.destination,
                                series_uids=series, study_uid=study)
    shown = sum(row.count for row in rows)
    print(f"outbox: {entries} {'entry' if entries == 1 else 'entries'}"
          + ("" if args.all or not rows else f" in {len(rows)} line(s), one per output "
             "series, destination and state (--all: every entry)")
          + (f"; the newest {shown} shown (--limit)" if shown < entries else ""))
    if not rows:
        return 0
    print(f"{'id':>6} {'destination':12} {'state':9} {'kind':8} {'count':>5} {'tries':>5} "
          f"{'next retry (UTC)':19} {'accession':16} {'input series (tail)':20} "
          f"{'output (tail)':20} last status / reason")
    for row in rows:
        status = f"0x{row.last_status:04X} " if row.last_status is not None else ""
        output = row.sop_uid if args.all else row.series_uid
        print(f"{row.id:6} {row.destination:12.12} {row.state:9} {row.kind:8} {row.count:5} "
              f"{row.attempts:5} {next_retry_text(row):19} {row.accession_number or '-':16} "
              f"{row.source_series_uid[-20:]:20} {output[-20:]:20} "
              f"{status}{row.last_error or '-'}")
    return 0


def _series_command(args: argparse.Namespace, verb: str) -> int:
    """reprocess / discard: one series named by its UID tail, changed in one audited
    transaction of the database the running node reads (it picks the change up at its
    next sweep or send pass)."""
    from dicom_node.ops.heartbeat import admin_node
    from dicom_node.outbox.admin import discard_entries
    from dicom_node.series.lookup import find_series
    from dicom_node.series.tracking import discard, reprocess
    from storage.audit import AuditLog

    audit = AuditLog(_engine(_load(args)), node=admin_node())
    user = _operator()
    with audit.transaction() as session:
        series = find_series(session, args.series)
        label = f"series {series.series_uid}" + (
            f" (accession {series.accession_number})" if series.accession_number else "")
        if verb == "reprocess":
            reprocess(audit, session, series, user)
            message = (f"{label}: queued for processing again as version {series.version} "
                       "(new result series, superseding the previous report)")
        else:
            previous = discard(audit, session, series, user)
            dropped = discard_entries(session, audit, series, user)
            message = (f"{label}: discarded (was {previous}); {dropped} outbox entr"
                       f"{'y' if dropped == 1 else 'ies'} dropped")
    print(message)
    return 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    return _series_command(args, "reprocess")


def cmd_discard(args: argparse.Namespace) -> int:
    return _series_command(args, "discard")


def _version() -> str:
    """The installed package's version (importlib.metadata: no DICOM or torch import)."""
    from dicom_node.ops.build_info import package_version

    return package_version()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dicom-node {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="config TOML (default: /etc/dicom-node/config.toml if "
                                        "it exists, else the config.toml that comes with the "
                                        "code: the source tree's, or the packaged one)")
        p.add_argument("--data-dir", help="use this data directory (database and file store) "
                                          "instead of the config's [node] data_dir")
        return p

    serve = add("serve", "run the node until SIGINT/SIGTERM")
    serve.add_argument("--role", choices=ROLES,
                       help="what this process runs (default: the config's [node] role, "
                            "'all'): receiver (store and record), worker (complete, triage, "
                            "process), sender (outbox, notifications); several nodes on one "
                            "PostgreSQL: docs/operations.md")
    serve.set_defaults(func=cmd_serve)
    receive = add("receive", "a second, receive-only Storage SCP process on another port "
                             "(same database and store) for many concurrent senders")
    receive.add_argument("--port", type=int, required=True)
    receive.set_defaults(func=cmd_receive)
    echo = add("echo", "C-ECHO the destinations (or --host/--port)")
    echo.add_argument("--host")
    echo.add_argument("--port", type=int, default=104)
    echo.add_argument("--ae-title")
    echo.set_defaults(func=cmd_echo)
    tail_help = ("a UID, or its tail as the listings print it (a unique suffix; an "
                 "ambiguous one is refused with the candidates)")
    audit = add("audit", "print recent audit events (per-instance events collapsed)")
    audit.add_argument("--study", help=f"StudyInstanceUID: {tail_help}")
    audit.add_argument("--series", help=f"SeriesInstanceUID: {tail_help}; a received series "
                                        "also shows the events of the outputs made from it")
    audit.add_argument("--kind", help="event kind prefix, e.g. series or send.attempt")
    audit.add_argument("--limit", type=int, default=50, help="lines to print (default 50)")
    audit.add_argument("--all", action="store_true",
                       help="every event, instead of one line per association/series for "
                            "per-instance events (stored, refused, send attempts)")
    audit.add_argument("--json", action="store_true", help="every event as one JSON line")
    audit.add_argument("--verify", action="store_true", help="check the hash chain")
    audit.set_defaults(func=cmd_audit)
    outbox = add("outbox", "list outbox entries; 'outbox retry' re-queues dead letters")
    outbox.add_argument("action", nargs="?", choices=["list", "retry"], default="list",
                        help="list (default) or retry (re-queue dead letters; audited "
                             "with your user name)")
    outbox.add_argument("--state", choices=["pending", "sent", "dead", "discarded"],
                        help="only entries in this state")
    outbox.add_argument("--destination", help="only this destination (its name)")
    outbox.add_argument("--series", help=f"input or output SeriesInstanceUID: {tail_help}")
    outbox.add_argument("--study", help=f"StudyInstanceUID: {tail_help}")
    outbox.add_argument("--all", action="store_true",
                        help="every entry instead of one line per output series, "
                             "destination and state")
    outbox.add_argument("--limit", type=int, default=50, help="lines to print (default 50)")
    outbox.set_defaults(func=cmd_outbox)
    reprocess = add("reprocess", "run the node's job on a series it holds again (a new "
                                 "result version, sent like any other); audited")
    reprocess.add_argument("series", help=f"SeriesInstanceUID: {tail_help}")
    reprocess.set_defaults(func=cmd_reprocess)
    discard = add("discard", "stop processing and sending a series: its queued job and "
                             "waiting outbox entries are dropped; audited")
    discard.add_argument("series", help=f"SeriesInstanceUID: {tail_help}")
    discard.set_defaults(func=cmd_discard)
    add("check-config", "validate the config and model, C-ECHO every destination"
        ).set_defaults(func=cmd_check_config)
    status = add("status", "whether the node runs (heartbeat, process, port), its version, "
                           "device, uptime and running job; series, queue, outbox, uncleared "
                           "errors, disk. Exit 0 running, 1 unhealthy, 3 not running")
    status.add_argument("--json", action="store_true",
                        help="one JSON object for machines instead of tables")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running"
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return 2
    except RequestRefused as exc:
        print(f"dicom-node {args.command}: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
