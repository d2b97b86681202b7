"""``dicom-node``: serve, receive, echo, audit, status, outbox, check-config."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig, default_config_path, load_config, with_data_dir
from dicom_node.errors import ConfigError, WeightsError
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
    from dicom_node.ops.systemd_notify import Notifier

    config = _load(args)
    if args.port == config.receiver.port:
        print(f"dicom-node receive: --port must differ from receiver.port ({args.port}), "
              "where 'dicom-node serve' listens", file=sys.stderr)
        return 2
    node = ReceiveOnlyNode(config, args.port)
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


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.analysis.process import AnalysisProcessError
    from dicom_node.ops.systemd_notify import Notifier
    from dicom_node.service import Node

    config = _load(args)
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


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.net.ae import echo

    config = _load(args)
    targets: list[tuple[str, str, int, TlsConfig | None]]
    if args.host:
        targets = [(args.ae_title or "ANY-SCP", args.host, args.port, None)]
    else:
        targets = [(d.ae_title, d.host, d.port, d.tls) for d in config.destinations
                   if not d.return_to_sender]
        if not targets:
            targets = [(config.receiver.ae_title, config.receiver.bind_address,
                        config.receiver.port, None)]
    failures = 0
    for ae_title, host, port, tls in targets:
        ok = echo(config.receiver.ae_title, ae_title, host, port, tls)
        print(f"C-ECHO {ae_title}@{host}:{port}: {'ok' if ok else 'FAILED'}")
        failures += not ok
    return 1 if failures else 0


def _engine(config: NodeConfig) -> Any:
    from storage.database import make_engine, make_session_factory
    return make_session_factory(make_engine(config.database_url))


def cmd_audit(args: argparse.Namespace) -> int:
    from storage.audit import recent_events, verify_chain

    sessions = _engine(_load(args))
    with sessions() as session:
        if args.verify:
            check = verify_chain(session)
            if check.ok:
                print(f"audit chain intact: {check.events} events")
                return 0
            print(f"audit chain BROKEN at event id {check.first_broken_id}: {check.reason}")
            return 1
        events = recent_events(session, limit=args.limit, study_uid=args.study,
                               series_uid=args.series, kind=args.kind)
        for event in events:
            if args.json:
                print(json.dumps({"id": event.id, "at": event.at.isoformat(), "kind": event.kind,
                                  "outcome": event.outcome, "study_uid": event.study_uid,
                                  "series_uid": event.series_uid, "sop_uid": event.sop_uid,
                                  "peer": event.peer, "detail": event.detail}))
            else:
                where = event.series_uid or event.study_uid or ""
                print(f"{event.at:%Y-%m-%d %H:%M:%S} {event.outcome:7} {event.kind:20} "
                      f"{event.peer:28.28} {where[-24:]:24} {event.detail}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Whether the node runs and what it is doing; exit 0 running, 1 running but
    unhealthy, 3 not running (as an init script's ``status``)."""
    from dicom_node.ops.status import format_status, node_status, status_exit_code

    config = _load(args)
    report = node_status(config, _engine(config))
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return status_exit_code(report)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config (loading it is the validation) and C-ECHO every destination."""
    from dicom_node.inference.model_weights import load_weights
    from dicom_node.net.ae import echo

    config = _load(args)
    print(f"config {config.source_path}: valid")
    try:
        model = load_weights(config.model.weights_path)
        print(f"model {model.card.name} {model.card.version} sha256 {model.sha256[:16]}...: ok")
    except WeightsError as exc:
        print(f"model: FAILED: {exc}")
        return 1
    failures = 0
    for dest in config.destinations:
        if dest.return_to_sender:
            routes = [(p.ae_title, p.return_host, p.return_port) for p in config.peers
                      if p.return_host and p.return_port]
            print(f"destination {dest.name}: return to sender ({len(routes)} return route(s))")
            targets = [(ae, host, port, dest.tls) for ae, host, port in routes
                       if host is not None and port is not None]
        else:
            targets = [(dest.ae_title, dest.host, dest.port, dest.tls)]
        for ae_title, host, port, tls in targets:
            ok = echo(config.receiver.ae_title, ae_title, host, port, tls)
            print(f"  C-ECHO {ae_title}@{host}:{port}: {'ok' if ok else 'FAILED'}")
            failures += not ok
    return 1 if failures else 0


def cmd_outbox(args: argparse.Namespace) -> int:
    from dicom_node.outbox.admin import list_entries, retry_dead
    from storage.audit import AuditLog

    sessions = _engine(_load(args))
    if args.action == "retry":
        audit = AuditLog(sessions)
        with audit.transaction() as session:
            count = retry_dead(session, audit, destination=args.destination)
        print(f"re-queued {count} dead letter(s)")
        return 0
    with sessions() as session:
        rows = list_entries(session, state=args.state, destination=args.destination,
                            limit=args.limit)
    for row in rows:
        status = f"0x{row.last_status:04X}" if row.last_status is not None else "-"
        print(f"{row.id:6} {row.destination:12.12} {row.state:8} {row.kind:4} "
              f"attempts {row.attempts:<3} status {status:6} {row.sop_uid[-20:]:20} "
              f"{row.last_error[:60]}")
    return 0


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

    add("serve", "run the node until SIGINT/SIGTERM").set_defaults(func=cmd_serve)
    receive = add("receive", "a second, receive-only Storage SCP process on another port "
                             "(same database and store) for many concurrent senders")
    receive.add_argument("--port", type=int, required=True)
    receive.set_defaults(func=cmd_receive)
    echo = add("echo", "C-ECHO the destinations (or --host/--port)")
    echo.add_argument("--host")
    echo.add_argument("--port", type=int, default=104)
    echo.add_argument("--ae-title")
    echo.set_defaults(func=cmd_echo)
    audit = add("audit", "print recent audit events")
    audit.add_argument("--study", help="StudyInstanceUID")
    audit.add_argument("--series", help="SeriesInstanceUID")
    audit.add_argument("--kind", help="event kind prefix, e.g. series or send.attempt")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--json", action="store_true")
    audit.add_argument("--verify", action="store_true", help="check the hash chain")
    audit.set_defaults(func=cmd_audit)
    outbox = add("outbox", "list outbox entries; 'outbox retry' re-queues dead letters")
    outbox.add_argument("action", nargs="?", choices=["list", "retry"], default="list")
    outbox.add_argument("--state", choices=["pending", "sent", "dead"])
    outbox.add_argument("--destination")
    outbox.add_argument("--limit", type=int, default=50)
    outbox.set_defaults(func=cmd_outbox)
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
    return result


if __name__ == "__main__":
    raise SystemExit(main())
