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
    """Where results are sent: a fixed AE, or back to the AE that sent the series."""

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    return_to_sender: bool = False
    tls: TlsConfig = field(default_factory=TlsConfig)  # [destinations.tls]: node as TLS client


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


@dataclass(frozen=True)
class MetricsConfig:
    """Optional HTTP endpoint with /healthz and Prometheus /metrics (loopback by default)."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: int = 9110


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


def _check_ae(title: str, key: str) -> None:
    if not AE_TITLE_RE.match(title) or title.strip() == "":
        raise ConfigError(f"{key} {title!r} is not a valid AE title (1-16 printable characters)")


def _check_port(port: int, key: str) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"{key} must be a port in 1..65535, got {port}")


def parse_config(raw: dict[str, Any], base_dir: Path, source: Path | None = None) -> NodeConfig:
    """Validate a parsed TOML document into a NodeConfig."""
    known = {"node", "receiver", "series", "selection", "model", "analysis", "outbox",
             "output", "fusion", "peers", "destinations", "retention", "tls", "metrics"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; allowed: {sorted(known)}")

    node = _table(raw, "node")
    bad = sorted(set(node) - {"data_dir", "database_url"})
    if bad:
        raise ConfigError(f"[node] unknown key(s) {bad}; allowed: ['data_dir', 'database_url']")
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
        if not dest.return_to_sender:
            _check_ae(dest.ae_title, f"{key}.ae_title")
            if not dest.host:
                raise ConfigError(f"{key}.host is required unless return_to_sender = true")
            _check_port(dest.port, f"{key}.port")
        destinations.append(dest)

    metrics: MetricsConfig = _build(MetricsConfig, "metrics", _table(raw, "metrics"))
    _check_port(metrics.port, "metrics.port")
    tls = parse_tls(raw.get("tls"), base_dir, section="tls", role="server")
    return NodeConfig(
        data_dir=data_dir, database_url=database_url, receiver=receiver, series=series,
        selection=selection, model=model, analysis=analysis, outbox=outbox, output=output,
        fusion=fusion, retention=retention, peers=tuple(peers), destinations=tuple(destinations),
        tls=tls, metrics=metrics, source_path=source,
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


def default_config_path() -> Path:
    """The embedded default config: ``config.toml`` at the project root."""
    return Path(__file__).resolve().parent.parent / "config.toml"
