"""Shared fixtures: test weights, node configs, a running node, receiving peers, and the
database backends (``database_url``: SQLite, and PostgreSQL marked ``postgres``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from benchmarks._common import free_port, port_open
from benchmarks._common import wait_for as poll
from dicom_node.config import NodeConfig, parse_config
from dicom_node.net.ae import keep_responses
from dicom_node.service import Node
from tests.orthanc_peer import OrthancProcess, launch_orthanc
from tests.postgres import PostgresCluster
from tests.weights_factory import make_test_weights

REPO = Path(__file__).resolve().parents[1]
VALIDATE_DICOM = REPO.parent / "shared" / "tools" / "validate-dicom"


def wait_for(predicate: Callable[[], bool], timeout_s: float = 120.0,
             interval_s: float = 0.2) -> bool:
    """Poll until predicate() is true; False on timeout (the test then asserts). The
    benchmarks' poll with the tests' defaults: long, and gentle on the CPU."""
    return poll(predicate, timeout_s, interval_s)


def written_outputs(session: Any) -> int:
    """How many output instances the node wrote (and so sends): per series an SC per
    slice, the SEG, the SR, the image-anchored SR when a lesion was found, and the KOS
    listing them. Read from the node's OutputInstance rows, which a job records (all at
    once) before it queues any of them; each version has one SEG, one SR and one KOS,
    and at most one image SR."""
    from sqlalchemy import func, select

    from storage.models import OutputInstance

    per_kind = dict(session.execute(select(OutputInstance.kind, func.count())
                                    .group_by(OutputInstance.kind)).all())
    assert set(per_kind) <= {"sc", "seg", "sr", "sr-image", "kos"}, per_kind
    assert (per_kind.get("kos", 0) == per_kind.get("seg", 0) == per_kind.get("sr", 0)
            >= per_kind.get("sr-image", 0)), per_kind
    return int(sum(per_kind.values()))


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not installed: run 'make install' (it installs the DICOM tools)")
    return path


def validate_dicom(path: Path) -> subprocess.CompletedProcess[str]:
    if not VALIDATE_DICOM.exists():
        pytest.skip(f"{VALIDATE_DICOM} not present (shared/ is beside the repo in CI)")
    return subprocess.run([str(VALIDATE_DICOM), str(path)], capture_output=True, text=True,
                          timeout=600, check=False)


def subprocess_node_toml(data_dir: Path, port: int, weights: Path, peer_ae: str,
                         destination_ae: str, destination_port: int,
                         extra_ports: tuple[int, ...] = ()) -> str:
    """The TOML of a fast-polling node for tests that run ``dicom-node serve`` as a
    subprocess (sending to one loopback destination)."""
    extra = f"extra_ports = [{', '.join(str(p) for p in extra_ports)}]\n" if extra_ports else ""
    return f"""
[node]
data_dir = "{data_dir}"
[receiver]
ae_title = "DICOMNODE"
port = {port}
{extra}min_free_disk_mb = 1.0
[series]
stable_after_s = 2.0
complete_grace_s = 0.5
sweep_interval_s = 0.2
[selection]
min_slices = 8
[model]
weights_path = "{weights}"
device = "cpu"
batch_size = 4
[outbox]
retry_initial_s = 0.5
retry_max_s = 1.0
send_interval_s = 0.2
[[peers]]
ae_title = "{peer_ae}"
[[destinations]]
name = "pacs"
ae_title = "{destination_ae}"
host = "127.0.0.1"
port = {destination_port}
"""


@pytest.fixture(scope="session")
def test_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "test-generator.pt"
    make_test_weights(path)
    return path


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throw-away PostgreSQL cluster for the session (skipped without the binaries,
    except under CI)."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """An empty database of its own on the session's cluster, dropped after the test."""
    name = postgres_cluster.create_database()
    yield postgres_cluster.url(name)
    postgres_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database a test runs on, once per backend: a test that takes this fixture runs
    on SQLite and on PostgreSQL (``-m postgres`` runs the PostgreSQL leg alone), and
    ``make_config`` puts it in ``[node] database_url``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node' / 'dicom-node.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def make_config(request: pytest.FixtureRequest, tmp_path: Path,
                test_weights: Path) -> Callable[..., NodeConfig]:
    """Build a NodeConfig for a node on a free loopback port; overrides per section. In a
    test that takes ``database_url``, the node uses that database."""
    # Resolved now, so the database outlives the nodes the test starts.
    database_url = (request.getfixturevalue("database_url")
                    if "database_url" in request.fixturenames else None)

    def build(destinations: list[dict[str, Any]] | None = None,
              peers: list[dict[str, Any]] | None = None, **sections: Any) -> NodeConfig:
        raw: dict[str, Any] = {
            "node": {"data_dir": str(tmp_path / "node"),
                     **({"database_url": database_url} if database_url else {})},
            "receiver": {"ae_title": "DICOMNODE", "port": free_port(), "min_free_disk_mb": 1.0},
            "series": {"stable_after_s": 1.0, "sweep_interval_s": 0.25},
            "selection": {"min_slices": 8},
            "model": {"weights_path": str(test_weights), "device": "cpu", "batch_size": 8},
            "outbox": {"retry_initial_s": 0.5, "retry_max_s": 2.0, "send_interval_s": 0.25,
                       "dimse_timeout_s": 10.0},
            "peers": peers if peers is not None else [
                {"ae_title": "STORESCU", "addresses": ["127.0.0.1"]},
                {"ae_title": "TESTSCU", "addresses": ["127.0.0.1"]},
            ],
            "destinations": destinations or [],
        }
        for name, values in sections.items():
            if isinstance(values, list):  # an array of tables, e.g. notifications
                raw[name] = values
            else:
                raw.setdefault(name, {}).update(values)
        return parse_config(raw, tmp_path)

    return build


@pytest.fixture
def start_node() -> Iterator[Callable[[NodeConfig], Node]]:
    nodes: list[Node] = []

    def start(config: NodeConfig) -> Node:
        node = Node(config)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@dataclass
class Received:
    """What a receiving peer got: the datasets and the files it kept."""

    folder: Path
    datasets: list[Dataset] = field(default_factory=list)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def read_all(self) -> list[Dataset]:
        return [dcmread(p) for p in self.files()]


class PynetdicomPacs:
    """A pynetdicom Storage SCP that keeps every instance as a file."""

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.received = Received(folder)
        self._lock = threading.Lock()
        self._server: Any = None
        folder.mkdir(parents=True, exist_ok=True)

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            ds.save_as(self.received.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            self.received.datasets.append(ds)
        return 0x0000

    def start(self) -> PynetdicomPacs:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@pytest.fixture
def pynetdicom_pacs(tmp_path: Path) -> Iterator[PynetdicomPacs]:
    pacs = PynetdicomPacs(tmp_path / "pacs").start()
    yield pacs
    pacs.stop()


class DcmtkStorescp:
    """DCMTK storescp as a foreign receiving peer."""

    def __init__(self, folder: Path, ae_title: str = "STORESCP") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DcmtkStorescp:
        binary = require_tool("storescp")
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(
            [binary, "--aetitle", self.ae_title, "--output-directory", str(self.folder),
             "--accept-all", "-uf", str(self.port)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: port_open(self.port), 10), "storescp did not start"
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def dcmtk_storescp(tmp_path: Path) -> Iterator[DcmtkStorescp]:
    scp = DcmtkStorescp(tmp_path / "storescp").start()
    yield scp
    scp.stop()


@pytest.fixture
def orthanc_peer(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], OrthancProcess]]:
    """``launch(config)``: an Orthanc running with that configuration dict (skipped when
    Orthanc or a plugin it names is not installed), stopped when the test ends."""
    started: list[OrthancProcess] = []

    def launch(config: dict[str, Any]) -> OrthancProcess:
        directory = tmp_path / f"orthanc-{len(started)}"
        directory.mkdir()
        orthanc = launch_orthanc(config, directory)
        started.append(orthanc)
        return orthanc

    yield launch
    for orthanc in started:
        orthanc.stop()


def storescu(files: list[Path], port: int, calling_ae: str = "STORESCU",
             called_ae: str = "DICOMNODE") -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu (a foreign sender)."""
    binary = require_tool("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([binary, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def pynetdicom_send(files: list[Path], port: int, calling_ae: str = "TESTSCU",
                    called_ae: str = "DICOMNODE") -> list[int]:
    """Send files with a pynetdicom SCU; returns the status of each C-STORE."""
    ae = AE(ae_title=calling_ae)
    datasets = [dcmread(p) for p in files]
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, sorted({str(ds.file_meta.TransferSyntaxUID)
                                                    for ds in datasets}))
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association with the node failed"
    keep_responses(assoc)  # pynetdicom's swallowed-response race (tests/test_sender_responses.py)
    statuses = []
    for ds in datasets:
        rsp = assoc.send_c_store(ds)
        statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    assoc.release()
    return statuses
