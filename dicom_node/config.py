"""The node's configuration: one frozen, typed object loaded from TOML.

Relative paths in the file are resolved against the directory of the file itself,
so the embedded ``config.toml`` works from any working directory. Every error names
the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError
from dicom_node.inference.fusion_style import COLORMAPS, FusionStyle
from dicom_node.net.tls import TlsConfig, parse_tls

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Peer:
    """A calling AE the node accepts, and where results return to it."""

    ae_title: str
    addresses: tuple[str, ...] = ()  # empty: any address
    return_host: str | None = None
    return_port: int | None = None


@dataclass(frozen=True)
class Destination:
    """Where results are sent: a fixed AE, back to the AE that sent the series
    (``type = "dimse"``, C-STORE), or a DICOMweb server (``type = "dicomweb"``, STOW-RS
    to ``url`` + ``/studies``; :mod:`dicom_node.outbox.stow`)."""

    name: str
    type: str = "dimse"  # dimse | dicomweb
    ae_title: str = ""
    host: str = ""
    port: int = 0
    return_to_sender: bool = False
    tls: TlsConfig = field(default_factory=TlsConfig)  # [destinations.tls]: node as TLS client
    #: DICOMweb: the service's base URL (STOW-RS posts to ``{url}/studies``).
    url: str = ""
    #: DICOMweb credentials, each read from a file at every send (never the config
    #: itself): a bearer token (the file holds the token), or ``user:password`` for
    #: HTTP basic authentication. At most one of them.
    bearer_token_file: Path | None = None
    basic_auth_file: Path | None = None
    #: DICOMweb over https: the server certificate is verified (against ``ca_file``
    #: when given, else the system's trusted CAs) unless ``verify_tls = false``.
    verify_tls: bool = True
    ca_file: Path | None = None
    #: DICOMweb: seconds to wait for the server's answer to one request.
    http_timeout_s: float = 120.0
    #: DICOMweb: at most this many instances per STOW-RS request.
    max_instances_per_request: int = 50

    @property
    def is_dicomweb(self) -> bool:
        return self.type == "dicomweb"


@dataclass(frozen=True)
class NotificationEndpoint:
    """Where the node says that a series is done, skipped or failed, or that results could
    not be delivered: a webhook (JSON, HMAC-signed) or a FHIR R4 server (a
    DiagnosticReport per done series): see dicom_node.outbox.notifications."""

    name: str
    type: str = "webhook"  # webhook | fhir
    url: str = ""
    #: which of done, skipped, failed, dead_letter (default: all four for a webhook,
    #: done for FHIR)
    events: tuple[str, ...] = ()
    #: webhook: the shared secret of the X-DicomNode-Signature HMAC-SHA256, read from a
    #: file (never the config itself). Required for a webhook.
    secret_file: Path | None = None
    #: FHIR (or a webhook behind a gateway): a bearer token read from a file at each send.
    bearer_token_file: Path | None = None
    #: false (default): no patient ID or name leaves the node in a message; true: the
    #: series' Patient ID is included (webhook ``patient_id``, FHIR subject identifier).
    include_patient_ids: bool = False
    verify_tls: bool = True
    ca_file: Path | None = None
    timeout_s: float = 30.0
    #: a message not delivered after this many tries (or ``[outbox] max_age_h``) is dead;
    #: the tries are spaced like the outbox's (``[outbox] retry_initial_s``/``retry_max_s``)
    max_attempts: int = 50


NOTIFICATION_TYPES = ("webhook", "fhir")
NOTIFICATION_EVENTS = ("done", "skipped", "failed", "dead_letter")


@dataclass(frozen=True)
class ReceiverConfig:
    ae_title: str = "DICOMNODE"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 10
    max_pdu_bytes: int = 65536
    #: false (default): an association whose called AE title is not ``ae_title`` is
    #: rejected (A-ASSOCIATE-RJ, called AE title not recognised); true: any is accepted.
    accept_any_called_ae: bool = False
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    min_free_disk_mb: float = 500.0
    max_instance_mb: float = 2048.0
    #: true: fsync each instance before its C-STORE response. false: the instance recorder
    #: fsyncs the files of each batch before committing their rows, and an association's
    #: release is answered only after that (durable per association, not per instance).
    fsync_each_instance: bool = False
    #: Ports of receive-only processes that ``dicom-node serve`` starts beside itself
    #: (``dicom-node receive``): many concurrent senders spread over them use more cores.
    extra_ports: tuple[int, ...] = ()
    #: A file in ``incoming/`` without a database row, or a temporary file, whose last
    #: change is older than this belongs to a receiver that died (a live one commits the
    #: row within a second of the file, and writes a temporary file continuously): on a
    #: database other nodes share, any receiver records (or removes) it, at its start
    #: and every ``orphan_sweep_interval_s``. One node on SQLite takes every such file
    #: at its start, whatever its age (no other receiver can be writing).
    orphan_grace_s: float = 300.0
    orphan_sweep_interval_s: float = 60.0


@dataclass(frozen=True)
class SeriesConfig:
    stable_after_s: float = 30.0
    # A geometrically complete series (contiguous positions at a constant spacing) is
    # ready after this shorter grace period; 0 disables early completion.
    complete_grace_s: float = 3.0
    sweep_interval_s: float = 1.0
    #: A series that is not geometrically complete and has instances from a transfer that
    #: did not end in a release (the sender aborted, or the node stopped mid-receive)
    #: waits this long for the sender's resend before it is processed as it is, so that
    #: the PACS gets one complete set instead of a partial one and then a second.
    interrupted_wait_s: float = 600.0


@dataclass(frozen=True)
class SelectionConfig:
    modalities: tuple[str, ...] = ("MR",)
    description_include: tuple[str, ...] = (r"(?i)t1",)
    description_exclude: tuple[str, ...] = (
        r"(?i)\bt2", r"(?i)flair", r"(?i)dwi", r"(?i)\badc\b", r"(?i)swi", r"(?i)localizer",
        r"(?i)scout", r"(?i)survey", r"(?i)\bpre\b", r"(?i)nativ", r"(?i)sag", r"(?i)cor\b",
    )
    require_contrast: bool = True
    contrast_description_regex: str = r"(?i)(\+\s*c\b|\bpost\b|\bgd\b|gado|\bkm\b|contrast|\bce\b|\+gd)"
    axial_tolerance_deg: float = 20.0
    min_slices: int = 16


@dataclass(frozen=True)
class ModelConfig:
    weights_path: Path
    device: str = "auto"
    batch_size: int = 16
    timeout_s: float = 900.0  # one series' inference; past it the job is retried, then failed
    retries: int = 2  # retries with half the batch size after a failure


@dataclass(frozen=True)
class AnalysisConfig:
    tbr_threshold: float = 1.6
    min_lesion_volume_ml: float = 0.1
    #: TBR in a warm child process (dicom_node/analysis/process.py), so the job writes
    #: and sends the fusion series meanwhile; false: in the job's thread.
    separate_process: bool = True
    #: A series' TBR analysis that runs longer fails its job (the process is restarted).
    timeout_s: float = 300.0
    #: Threads for the analysis' independent steps (same result for any number);
    #: 0: one per CPU the node may use (affinity and cgroup quota) beyond the one the job
    #: needs, at most 4 (on 2 CPUs one thread: a second one made the series slower there,
    #: docs/performance.md).
    threads: int = 0
    #: Stochastic passes of the generator per series for each lesion's TBR interval
    #: (dicom_node/analysis/uncertainty.py); 0: no interval (and no "equivocal" findings).
    uncertainty_samples: int = 4

    def thread_count(self) -> int:
        """``threads``, with 0 resolved for this machine."""
        if self.threads > 0:
            return self.threads
        return max(1, min(4, usable_cpus() - 1))


def usable_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container limited to 2 CPUs on a 64-core host counts 2)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity alone
    return cpus


@dataclass(frozen=True)
class OutboxConfig:
    retry_initial_s: float = 5.0
    retry_max_s: float = 300.0
    max_attempts: int = 50
    max_age_h: float = 72.0
    send_interval_s: float = 1.0
    dimse_timeout_s: float = 10.0
    batch_size: int = 500
    #: Associations opened in parallel to one destination for a batch of at least
    #: ``2 * min_instances_per_association`` instances; each sends a contiguous share.
    associations_per_destination: int = 2
    min_instances_per_association: int = 32
    #: How long a sender holds the entries it claimed (several senders on one database),
    #: renewed at every heartbeat: a dead sender's batch is claimed again after this.
    lease_s: float = 60.0


@dataclass(frozen=True)
class MetricsConfig:
    """Optional HTTP endpoint with /healthz and Prometheus /metrics (loopback by default)."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: int = 9110
    #: /healthz says "degraded" (503) while an outbox entry has waited longer than this
    #: for its delivery (retries that keep failing), or while there are dead letters.
    degraded_pending_age_s: float = 900.0


@dataclass(frozen=True)
class RetentionConfig:
    """Hours after which delivered data is deleted; 0 keeps it forever."""

    incoming_h: float = 720.0
    outputs_h: float = 720.0
    interval_s: float = 3600.0


@dataclass(frozen=True)
class OutputConfig:
    manufacturer: str = "dicom-node"
    institution_name: str = ""
    series_number_sc: int = 9901
    series_number_sr: int = 9902
    series_number_seg: int = 9903
    series_number_sr_image: int = 9904  # the image-anchored TBR SR (lesion outlines)
    series_number_kos: int = 9905  # the KOS that lists the result set (IHE AIR)


#: ``dicom-node serve --role``: ``receiver`` stores and records what it receives (no
#: model); ``worker`` completes, triages and processes series (the model); ``sender``
#: drains the outbox and sends notifications (no model); ``all`` is the three in one.
ROLES = ("all", "receiver", "worker", "sender")


@dataclass(frozen=True)
class NodeConfig:
    """The whole configuration, immutable once loaded."""

    data_dir: Path
    database_url: str
    receiver: ReceiverConfig
    series: SeriesConfig
    selection: SelectionConfig
    model: ModelConfig
    analysis: AnalysisConfig
    outbox: OutboxConfig
    output: OutputConfig
    fusion: FusionStyle
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)  # [tls]: the receiver as TLS server
    peers: tuple[Peer, ...] = ()
    destinations: tuple[Destination, ...] = ()
    notifications: tuple[NotificationEndpoint, ...] = ()
    #: How often the running node writes its heartbeat row (``dicom-node status`` calls
    #: a node whose last beat is older than 3 intervals + 2 s not running).
    heartbeat_interval_s: float = 5.0
    #: What ``dicom-node serve`` runs (``[node] role``, ``serve --role``): ``all``, or one
    #: part of it for several nodes on one PostgreSQL (see :data:`ROLES`).
    role: str = "all"
    #: How long a worker holds a job without renewing it (renewed at every heartbeat): a
    #: worker that dies loses its job to another after this.
    lease_s: float = 30.0
    source_path: Path | None = field(default=None, compare=False)

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    def peer(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title:
                return peer
        return None


def _table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _build(cls: type, section: str, values: dict[str, Any], **extra: Any) -> Any:
    """Instantiate a dataclass section, naming unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = fields[name].default
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{section}.{name} must be a list of strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{section}.{name} must be true or false")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{section}.{name} must be a number")
            value = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{section}.{name} must be an integer")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{section}.{name} must be a string")
        kwargs[name] = value
    kwargs.update(extra)
    return cls(**kwargs)


DESTINATION_TYPES = ("dimse", "dicomweb")


def _dicomweb_destination(dest: Destination, key: str, base_dir: Path) -> Destination:
    """A ``type = "dicomweb"`` destination checked, its files resolved and readable."""
    if not re.match(r"^https?://[^/\s]+", dest.url):
        raise ConfigError(f"{key}.url {dest.url!r} is not an http:// or https:// URL")
    if dest.return_to_sender or dest.ae_title or dest.host or dest.port or dest.tls.enabled:
        raise ConfigError(f"{key}: a dicomweb destination takes url (and credentials), not "
                          "ae_title, host, port, tls or return_to_sender")
    if dest.bearer_token_file and dest.basic_auth_file:
        raise ConfigError(f"{key}: give bearer_token_file or basic_auth_file, not both")
    if dest.http_timeout_s <= 0:
        raise ConfigError(f"{key}.http_timeout_s must be > 0")
    if dest.max_instances_per_request < 1:
        raise ConfigError(f"{key}.max_instances_per_request must be >= 1")
    files: dict[str, Path | None] = {}
    for name in ("bearer_token_file", "basic_auth_file", "ca_file"):
        value = getattr(dest, name)
        if value is None:
            files[name] = None
            continue
        path = Path(value)
        path = path if path.is_absolute() else (base_dir / path).resolve()
        if not os.access(path, os.R_OK) or not path.is_file():
            raise ConfigError(f"{key}.{name}: cannot read {path}")
        files[name] = path
    return replace(dest, url=dest.url.rstrip("/"), bearer_token_file=files["bearer_token_file"],
                   basic_auth_file=files["basic_auth_file"], ca_file=files["ca_file"])


def _readable_file(value: Any, key: str, base_dir: Path) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    path = path if path.is_absolute() else (base_dir / path).resolve()
    if not os.access(path, os.R_OK) or not path.is_file():
        raise ConfigError(f"{key}: cannot read {path}")
    return path


def _notification_endpoints(raw: Any, base_dir: Path) -> tuple[NotificationEndpoint, ...]:
    """``[[notifications]]``: each endpoint checked, its files resolved and readable."""
    if not isinstance(raw, list):
        raise ConfigError("[[notifications]] must be an array of tables")
    out: list[NotificationEndpoint] = []
    for i, item in enumerate(raw):
        key = f"notifications[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{key} needs a name")
        end: NotificationEndpoint = _build(NotificationEndpoint, key, item)
        if end.name in {e.name for e in out}:
            raise ConfigError(f"{key}: duplicate notification name {end.name!r}")
        if end.type not in NOTIFICATION_TYPES:
            raise ConfigError(f"{key}.type {end.type!r} is not one of {list(NOTIFICATION_TYPES)}")
        if not re.match(r"^https?://[^/\s]+", end.url):
            raise ConfigError(f"{key}.url {end.url!r} is not an http:// or https:// URL")
        events = end.events or (NOTIFICATION_EVENTS if end.type == "webhook" else ("done",))
        unknown = sorted(set(events) - set(NOTIFICATION_EVENTS))
        if unknown:
            raise ConfigError(f"{key}.events {unknown} not among {list(NOTIFICATION_EVENTS)}")
        if end.type == "fhir" and set(events) != {"done"}:
            raise ConfigError(f"{key}.events: a FHIR endpoint takes done only (a "
                              "DiagnosticReport per processed series)")
        if end.type == "webhook" and end.secret_file is None:
            raise ConfigError(f"{key}.secret_file is required for a webhook (the HMAC key)")
        if end.timeout_s <= 0:
            raise ConfigError(f"{key}.timeout_s must be > 0")
        if end.max_attempts < 1:
            raise ConfigError(f"{key}.max_attempts must be >= 1")
        out.append(replace(
            end, url=end.url.rstrip("/"), events=tuple(events),
            secret_file=_readable_file(end.secret_file, f"{key}.secret_file", base_dir),
            bearer_token_file=_readable_file(end.bearer_token_file, f"{key}.bearer_token_file",
                                             base_dir),
            ca_file=_readable_file(end.ca_file, f"{key}.ca_file", base_dir)))
    return tuple(out)


def _check_ae(title: str, key: str) -> None:
    if not AE_TITLE_RE.match(title) or title.strip() == "":
        raise ConfigError(f"{key} {title!r} is not a valid AE title (1-16 printable characters)")


def _check_port(port: int, key: str) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"{key} must be a port in 1..65535, got {port}")


def parse_config(raw: dict[str, Any], base_dir: Path, source: Path | None = None) -> NodeConfig:
    """Validate a parsed TOML document into a NodeConfig."""
    known = {"node", "receiver", "series", "selection", "model", "analysis", "outbox",
             "output", "fusion", "peers", "destinations", "notifications", "retention", "tls",
             "metrics"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; allowed: {sorted(known)}")

    node = _table(raw, "node")
    node_keys = ["data_dir", "database_url", "heartbeat_interval_s", "role", "lease_s"]
    bad = sorted(set(node) - set(node_keys))
    if bad:
        raise ConfigError(f"[node] unknown key(s) {bad}; allowed: {node_keys}")
    heartbeat_interval_s = node.get("heartbeat_interval_s", 5.0)
    if (isinstance(heartbeat_interval_s, bool) or not isinstance(heartbeat_interval_s, int | float)
            or not 0 < heartbeat_interval_s <= 300):
        raise ConfigError("node.heartbeat_interval_s must be a number of seconds in (0, 300]")
    lease_s = node.get("lease_s", 30.0)
    if isinstance(lease_s, bool) or not isinstance(lease_s, int | float) or lease_s <= 0:
        raise ConfigError("node.lease_s must be a number of seconds > 0")
    role = node.get("role", "all")
    if role not in ROLES:
        raise ConfigError(f"node.role must be one of {list(ROLES)}, got {role!r}")
    data_dir = Path(str(node.get("data_dir", "var")))
    if not data_dir.is_absolute():
        data_dir = (base_dir / data_dir).resolve()
    database_url = str(node.get("database_url", "")) or f"sqlite:///{data_dir / 'dicom-node.db'}"

    receiver_raw = dict(_table(raw, "receiver"))
    extra_ports = receiver_raw.pop("extra_ports", [])
    if not isinstance(extra_ports, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in extra_ports):
        raise ConfigError("receiver.extra_ports must be a list of port numbers")
    receiver: ReceiverConfig = _build(ReceiverConfig, "receiver", receiver_raw,
                                      extra_ports=tuple(extra_ports))
    _check_ae(receiver.ae_title, "receiver.ae_title")
    _check_port(receiver.port, "receiver.port")
    for extra_port in receiver.extra_ports:
        _check_port(extra_port, "receiver.extra_ports")
    if len({receiver.port, *receiver.extra_ports}) != 1 + len(receiver.extra_ports):
        raise ConfigError("receiver.extra_ports must differ from receiver.port and each other")
    series: SeriesConfig = _build(SeriesConfig, "series", _table(raw, "series"))
    if series.stable_after_s < 0 or series.sweep_interval_s <= 0:
        raise ConfigError("series.stable_after_s must be >= 0 and series.sweep_interval_s > 0")
    if lease_s <= 2 * heartbeat_interval_s:
        raise ConfigError(f"node.lease_s ({lease_s:g}) must be more than twice "
                          f"node.heartbeat_interval_s ({heartbeat_interval_s:g}): the heartbeat "
                          "renews the leases of the work the node holds")
    selection: SelectionConfig = _build(SelectionConfig, "selection", _table(raw, "selection"))
    for pattern in (*selection.description_include, *selection.description_exclude,
                    selection.contrast_description_regex):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"[selection] invalid regular expression {pattern!r}: {exc}") from exc

    model_raw = dict(_table(raw, "model"))
    if "weights_path" not in model_raw:
        raise ConfigError("model.weights_path is required (the generator weights file)")
    weights = Path(str(model_raw.pop("weights_path")))
    if not weights.is_absolute():
        weights = (base_dir / weights).resolve()
    model: ModelConfig = _build(ModelConfig, "model", model_raw, weights_path=weights)
    if model.device not in DEVICES:
        raise ConfigError(f"model.device must be one of {DEVICES}, got {model.device!r}")
    if model.batch_size < 1:
        raise ConfigError("model.batch_size must be >= 1")

    analysis: AnalysisConfig = _build(AnalysisConfig, "analysis", _table(raw, "analysis"))
    if analysis.timeout_s <= 0:
        raise ConfigError("analysis.timeout_s must be > 0")
    if analysis.threads < 0:
        raise ConfigError("analysis.threads must be >= 0 (0: CPUs - 1, at most 4)")
    if analysis.uncertainty_samples < 0 or analysis.uncertainty_samples == 1:
        raise ConfigError("analysis.uncertainty_samples must be 0 (off) or at least 2")
    if analysis.tbr_threshold <= 1.0:
        raise ConfigError("analysis.tbr_threshold must be > 1.0 (a ratio to background)")
    outbox: OutboxConfig = _build(OutboxConfig, "outbox", _table(raw, "outbox"))
    if not 1 <= outbox.associations_per_destination <= 16 or outbox.min_instances_per_association < 1:
        raise ConfigError("outbox.associations_per_destination must be 1..16 and "
                          "outbox.min_instances_per_association >= 1")
    output: OutputConfig = _build(OutputConfig, "output", _table(raw, "output"))
    retention: RetentionConfig = _build(RetentionConfig, "retention", _table(raw, "retention"))
    if retention.incoming_h < 0 or retention.outputs_h < 0 or retention.interval_s <= 0:
        raise ConfigError("retention.incoming_h and outputs_h must be >= 0 (0 keeps forever), "
                          "retention.interval_s > 0")

    fusion_raw = _table(raw, "fusion")
    if fusion_raw.get("colormap", "hot") not in COLORMAPS:
        raise ConfigError(f"fusion.colormap must be one of {COLORMAPS}")
    try:
        fusion = FusionStyle.from_dict(fusion_raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[fusion] {exc}") from exc

    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("[[peers]] must be an array of tables")
    peers = []
    for i, item in enumerate(peers_raw):
        key = f"peers[{i}]"
        if not isinstance(item, dict) or "ae_title" not in item:
            raise ConfigError(f"{key} needs an ae_title")
        peer: Peer = _build(Peer, key, item, addresses=tuple(item.get("addresses", ())))
        _check_ae(peer.ae_title, f"{key}.ae_title")
        if (peer.return_host is None) != (peer.return_port is None):
            raise ConfigError(f"{key}: give both return_host and return_port, or neither")
        if peer.return_port is not None:
            _check_port(peer.return_port, f"{key}.return_port")
        peers.append(peer)

    dest_raw = raw.get("destinations", [])
    if not isinstance(dest_raw, list):
        raise ConfigError("[[destinations]] must be an array of tables")
    destinations = []
    names: set[str] = set()
    for i, item in enumerate(dest_raw):
        key = f"destinations[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{key} needs a name")
        item = dict(item)
        dest_tls = parse_tls(item.pop("tls", None), base_dir, section=f"{key}.tls", role="client")
        dest: Destination = _build(Destination, key, item, tls=dest_tls)
        if dest.name in names:
            raise ConfigError(f"{key}: duplicate destination name {dest.name!r}")
        names.add(dest.name)
        if dest.type not in DESTINATION_TYPES:
            raise ConfigError(f"{key}.type {dest.type!r} is not one of {list(DESTINATION_TYPES)}")
        if dest.is_dicomweb:
            destinations.append(_dicomweb_destination(dest, key, base_dir))
            continue
        if dest.url or dest.bearer_token_file or dest.basic_auth_file or dest.ca_file:
            raise ConfigError(f"{key}: url, bearer_token_file, basic_auth_file and ca_file "
                              "belong to a destination of type = \"dicomweb\"")
        if not dest.return_to_sender:
            _check_ae(dest.ae_title, f"{key}.ae_title")
            if not dest.host:
                raise ConfigError(f"{key}.host is required unless return_to_sender = true")
            _check_port(dest.port, f"{key}.port")
        destinations.append(dest)

    notifications = _notification_endpoints(raw.get("notifications", []), base_dir)
    metrics: MetricsConfig = _build(MetricsConfig, "metrics", _table(raw, "metrics"))
    _check_port(metrics.port, "metrics.port")
    if metrics.degraded_pending_age_s <= 0:
        raise ConfigError("metrics.degraded_pending_age_s must be > 0")
    tls = parse_tls(raw.get("tls"), base_dir, section="tls", role="server")
    return NodeConfig(
        data_dir=data_dir, database_url=database_url, receiver=receiver, series=series,
        selection=selection, model=model, analysis=analysis, outbox=outbox, output=output,
        fusion=fusion, retention=retention, peers=tuple(peers), destinations=tuple(destinations),
        notifications=notifications,
        tls=tls, metrics=metrics, heartbeat_interval_s=float(heartbeat_interval_s),
        role=str(role), lease_s=float(lease_s), source_path=source,
    )


def load_config(path: Path) -> NodeConfig:
    """Read and validate the TOML file at ``path``."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(raw, path.resolve().parent, source=path.resolve())


def with_data_dir(config: NodeConfig, data_dir: Path) -> NodeConfig:
    """The same configuration on another data directory (database, file store); a
    database_url the config set explicitly is kept, the default SQLite file moves along."""
    default_url = f"sqlite:///{config.data_dir / 'dicom-node.db'}"
    url = (f"sqlite:///{data_dir / 'dicom-node.db'}" if config.database_url == default_url
           else config.database_url)
    return replace(config, data_dir=data_dir, database_url=url)


#: The system-wide configuration (systemd's ConfigurationDirectory): used when it exists.
ETC_CONFIG_PATH = Path("/etc/dicom-node/config.toml")


def embedded_config_path() -> Path:
    """The default config that comes with the code: the source tree's ``config.toml``
    (a checkout or an editable install: state under its ``var/``), else the copy packaged
    in ``dicom_node/`` (a non-editable install: state under ``/var/lib/dicom-node``)."""
    package_dir = Path(__file__).resolve().parent
    source_tree = package_dir.parent
    if (source_tree / "pyproject.toml").is_file() and (source_tree / "config.toml").is_file():
        return source_tree / "config.toml"
    return package_dir / "config.toml"


def default_config_path(etc_path: Path = ETC_CONFIG_PATH) -> Path:
    """The config ``dicom-node`` reads without ``--config``: ``/etc/dicom-node/config.toml``
    if it exists, else :func:`embedded_config_path`."""
    return etc_path if etc_path.is_file() else embedded_config_path()
