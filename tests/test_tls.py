"""DICOM TLS: a throwaway CA made at run time, real pynetdicom and DCMTK peers on loopback.

Only peers whose certificates chain to the configured CA get in; a client that
cannot verify the server refuses to talk to it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import NodeConfig
from dicom_node.errors import ConfigError
from dicom_node.net.tls import (
    TlsConfig,
    client_context,
    client_tls_args,
    parse_tls,
    peer_certificate_subject,
    server_context,
)
from dicom_node.service import Node
from tests.conftest import free_port, require_tool, wait_for
from tests.dicom_factory import SeriesSpec, write_series

SUCCESS = 0x0000


# -- a throwaway PKI ----------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """PEM files of the site CA, the node's and a peer's certificates, and an outsider."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody here trusts
    other_server_cert: Path
    other_server_key: Path
    other_client_cert: Path
    other_client_key: Path
    named_server_cert: Path  # SAN pacs.example only: no IP, no localhost
    named_server_key: Path


def _issue(ca: trustme.CA, folder: Path, stem: str, *identities: str,
           common_name: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*identities, common_name=common_name, key_type=trustme.KeyType.RSA)
    cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    # RSA keys: DCMTK's default BCP 195 profile offers ECDHE-RSA suites for TLS 1.2.
    site = trustme.CA(organization_name="Test Hospital", key_type=trustme.KeyType.RSA)
    other = trustme.CA(organization_name="Elsewhere", key_type=trustme.KeyType.RSA)
    site.cert_pem.write_to_path(str(folder / "ca.crt"))
    other.cert_pem.write_to_path(str(folder / "other-ca.crt"))
    server = _issue(site, folder, "server", "localhost", "127.0.0.1", common_name="DICOMNODE")
    client = _issue(site, folder, "client", "testscu.example", common_name="TESTSCU")
    other_server = _issue(other, folder, "other-server", "localhost", "127.0.0.1",
                          common_name="ROGUE")
    other_client = _issue(other, folder, "other-client", "rogue.example", common_name="ROGUE")
    named = _issue(site, folder, "named-server", "pacs.example", common_name="PACS")
    return Pki(folder / "ca.crt", *server, *client, folder / "other-ca.crt", *other_server,
               *other_client, *named)


def server_cfg(pki: Pki, **overrides: Any) -> TlsConfig:
    values: dict[str, Any] = {"enabled": True, "cert_file": pki.server_cert,
                              "key_file": pki.server_key, "ca_file": pki.ca}
    values.update(overrides)
    return TlsConfig(**values)


def client_cfg(pki: Pki, **overrides: Any) -> TlsConfig:
    values: dict[str, Any] = {"enabled": True, "ca_file": pki.ca, "cert_file": pki.client_cert,
                              "key_file": pki.client_key}
    values.update(overrides)
    return TlsConfig(**values)


# -- peers --------------------------------------------------------------------------------
class TlsScp:
    """A pynetdicom Storage SCP behind ``server_context``; records what it stored."""

    def __init__(self, cfg: TlsConfig, ae_title: str = "TLSSCP") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.stored: list[str] = []
        self.subjects: list[str | None] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_supported_context(MRImageStorage)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, ssl_context=server_context(cfg),
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.stored.append(str(getattr(event.request, "AffectedSOPInstanceUID", "")))
            sock = event.assoc.dul.socket
            self.subjects.append(peer_certificate_subject(sock.socket if sock else None))
        return SUCCESS

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


@pytest.fixture
def tls_scp(pki: Pki) -> Iterator[Callable[..., TlsScp]]:
    servers: list[TlsScp] = []

    def start(cfg: TlsConfig | None = None) -> TlsScp:
        scp = TlsScp(cfg or server_cfg(pki))
        servers.append(scp)
        return scp

    yield start
    for scp in servers:
        scp.stop()


@pytest.fixture(scope="module")
def mr_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("mr"), SeriesSpec(n_slices=3, rows=32,
                                                                   columns=32), seed=5)


def tls_store(files: list[Path], port: int, cfg: TlsConfig | None, host: str = "127.0.0.1",
              calling_ae: str = "TESTSCU", called_ae: str = "TLSSCP") -> list[int] | None:
    """C-STORE over TLS with a pynetdicom SCU; None when no association was established."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(MRImageStorage)
    tls_args = client_tls_args(cfg, host) if cfg is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        return None
    statuses = []
    for path in files:
        rsp = assoc.send_c_store(dcmread(path))
        statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    assoc.release()
    return statuses


def sop_uids(files: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


# -- pynetdicom to pynetdicom ------------------------------------------------------------
def test_trusted_client_stores_over_tls(pki: Pki, tls_scp: Callable[..., TlsScp],
                                        mr_files: list[Path]) -> None:
    scp = tls_scp(server_cfg(pki, require_client_cert=True))
    assert tls_store(mr_files, scp.port, client_cfg(pki)) == [SUCCESS] * len(mr_files)
    assert scp.stored == sop_uids(mr_files)
    # the SCP saw the verified client identity (for the audit log)
    assert scp.subjects[0] is not None and "commonName=TESTSCU" in scp.subjects[0]


def test_client_refuses_server_its_ca_does_not_trust(
        pki: Pki, tls_scp: Callable[..., TlsScp], mr_files: list[Path]) -> None:
    rogue = tls_scp(server_cfg(pki, cert_file=pki.other_server_cert,
                               key_file=pki.other_server_key))
    assert tls_store(mr_files, rogue.port, client_cfg(pki)) is None
    # and a client that trusts only the other CA refuses the genuine server
    genuine = tls_scp()
    assert tls_store(mr_files, genuine.port, client_cfg(pki, ca_file=pki.other_ca)) is None
    assert rogue.stored == [] and genuine.stored == []


def test_plain_tcp_client_gets_nothing_from_tls_server(
        pki: Pki, tls_scp: Callable[..., TlsScp], mr_files: list[Path]) -> None:
    scp = tls_scp()
    assert tls_store(mr_files, scp.port, None) is None
    assert scp.stored == []


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_required_client_certificate_refuses_untrusted_peers(
        who: str, pki: Pki, tls_scp: Callable[..., TlsScp], mr_files: list[Path]) -> None:
    scp = tls_scp(server_cfg(pki, require_client_cert=True))
    if who == "no certificate":
        cfg = client_cfg(pki, cert_file=None, key_file=None)
    else:
        cfg = client_cfg(pki, cert_file=pki.other_client_cert, key_file=pki.other_client_key)
    assert tls_store(mr_files, scp.port, cfg) is None
    assert scp.stored == []
    # the same server still serves a trusted peer afterwards
    assert tls_store(mr_files[:1], scp.port, client_cfg(pki)) == [SUCCESS]


def test_client_certificate_optional_without_require(
        pki: Pki, tls_scp: Callable[..., TlsScp], mr_files: list[Path]) -> None:
    scp = tls_scp(server_cfg(pki, require_client_cert=False))
    assert tls_store(mr_files[:1], scp.port,
                     client_cfg(pki, cert_file=None, key_file=None)) == [SUCCESS]
    assert scp.subjects == [None]


def test_hostname_check_and_its_documented_opt_out(
        pki: Pki, tls_scp: Callable[..., TlsScp], mr_files: list[Path]) -> None:
    """A certificate naming pacs.example only, reached as 127.0.0.1."""
    scp = tls_scp(server_cfg(pki, cert_file=pki.named_server_cert,
                             key_file=pki.named_server_key))
    one = mr_files[:1]
    assert tls_store(one, scp.port, client_cfg(pki)) is None  # IP not in the SAN
    assert tls_store(one, scp.port, client_cfg(pki, server_hostname="pacs.example")) == [SUCCESS]
    assert tls_store(one, scp.port, client_cfg(pki, check_hostname=False)) == [SUCCESS]
    # the CA is still checked with check_hostname = false
    assert tls_store(one, scp.port, client_cfg(pki, check_hostname=False,
                                               ca_file=pki.other_ca)) is None


def test_silent_tcp_peer_does_not_block_other_callers(
        pki: Pki, tls_scp: Callable[..., TlsScp], mr_files: list[Path]) -> None:
    """The handshake runs in the association's thread, not in the accept loop."""
    scp = tls_scp()
    with socket.create_connection(("127.0.0.1", scp.port)):
        time.sleep(0.2)  # accepted and waiting for a ClientHello that never comes
        started = time.monotonic()
        assert tls_store(mr_files[:1], scp.port, client_cfg(pki)) == [SUCCESS]
        assert time.monotonic() - started < 5


def test_min_version_tls13_refuses_tls12_client(
        pki: Pki, tls_scp: Callable[..., TlsScp], mr_files: list[Path]) -> None:
    scp = tls_scp(server_cfg(pki, min_version="TLSv1.3"))
    ctx = client_context(client_cfg(pki))
    ctx.maximum_version = ctx.minimum_version  # a TLS 1.2-only peer
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.connection_timeout = 10
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="TLSSCP", tls_args=(ctx, "127.0.0.1"))
    assert not assoc.is_established
    assert tls_store(mr_files[:1], scp.port, client_cfg(pki)) == [SUCCESS]


# -- DCMTK storescu as a foreign TLS client ------------------------------------------------
def _dcmtk_storescu_tls(args: list[str], files: list[Path],
                        port: int) -> subprocess.CompletedProcess[str]:
    binary = require_tool("storescu")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             check=False).stdout
    if "OpenSSL" not in version:
        pytest.skip("DCMTK storescu was built without OpenSSL: no +tls support")
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([binary, *args, "-aet", "STORESCU", "-aec", "TLSSCP", "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_dcmtk_storescu_with_tls(pki: Pki, tls_scp: Callable[..., TlsScp],
                                 mr_files: list[Path]) -> None:
    scp = tls_scp(server_cfg(pki, require_client_cert=True))
    done = _dcmtk_storescu_tls(["+tls", str(pki.client_key), str(pki.client_cert),
                                "+cf", str(pki.ca)], mr_files, scp.port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert scp.stored == sop_uids(mr_files)
    assert scp.subjects[0] is not None and "TESTSCU" in scp.subjects[0]


def test_dcmtk_storescu_refused_with_untrusted_certificate(
        pki: Pki, tls_scp: Callable[..., TlsScp], mr_files: list[Path]) -> None:
    scp = tls_scp(server_cfg(pki, require_client_cert=True))
    rogue = _dcmtk_storescu_tls(["+tls", str(pki.other_client_key), str(pki.other_client_cert),
                                 "+cf", str(pki.ca)], mr_files, scp.port)
    assert rogue.returncode != 0
    # storescu trusting only the other CA refuses our server
    wrong_ca = _dcmtk_storescu_tls(["+tls", str(pki.client_key), str(pki.client_cert),
                                    "+cf", str(pki.other_ca)], mr_files, scp.port)
    assert wrong_ca.returncode != 0
    assert scp.stored == []


# -- configuration -------------------------------------------------------------------------
def test_parse_tls_resolves_paths_against_base_dir(pki: Pki) -> None:
    base = pki.ca.parent
    server = parse_tls({"enabled": True, "cert_file": "server.crt", "key_file": "server.key",
                        "ca_file": "ca.crt", "require_client_cert": True,
                        "min_version": "TLSv1.3"}, base, section="tls", role="server")
    assert server.cert_file == pki.server_cert and server.ca_file == pki.ca
    assert server.require_client_cert and server.min_version == "TLSv1.3"
    client = parse_tls({"enabled": True, "ca_file": "ca.crt", "check_hostname": False},
                       base, section="destinations[0].tls", role="client")
    assert client.cert_file is None and not client.check_hostname
    assert parse_tls(None, base, section="tls", role="server") == TlsConfig()
    assert not parse_tls({"enabled": False}, base, section="tls", role="server").enabled


@pytest.mark.parametrize(("table", "role", "message"), [
    ({"enabled": True, "key_file": "server.key"}, "server", "tls.cert_file is required"),
    ({"enabled": True, "cert_file": "server.crt", "key_file": "server.key",
      "require_client_cert": True}, "server", "tls.ca_file is required"),
    ({"enabled": True, "cert_file": "server.crt", "key_file": "missing.key"}, "server",
     "tls.key_file: file not found"),
    ({"enabled": True, "cert_file": "server.crt", "key_file": "client.key"}, "server",
     "tls.cert_file / tls.key_file"),
    ({"enabled": True, "cert_file": "server.crt", "key_file": "server.key",
      "min_version": "TLSv1.1"}, "server", "tls.min_version must be one of"),
    ({"enabled": True, "cert_file": "server.crt", "key_file": "server.key",
      "ciphers": "NO-SUCH-CIPHER"}, "server", "tls.ciphers"),
    ({"enabled": "yes"}, "server", "tls.enabled must be true or false"),
    ({"enabled": True, "certfile": "x"}, "server", "unknown key(s) ['certfile']"),
    ({"enabled": True, "cert_file": "server.crt", "key_file": "server.key",
      "check_hostname": False}, "server", "destinations (the client side) only"),
    ({"enabled": True}, "client", "tls.ca_file is required"),
    ({"enabled": True, "ca_file": "ca.crt", "cert_file": "client.crt"}, "client",
     "give both cert_file and key_file"),
    ({"enabled": True, "ca_file": "server.key"}, "client", "tls.ca_file: cannot load"),
])
def test_parse_tls_names_the_bad_key(pki: Pki, table: dict[str, Any], role: Any,
                                     message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tls(table, pki.ca.parent, section="tls", role=role)
    assert message in str(info.value)


# -- the node itself ----------------------------------------------------------------------
class TlsPacs(TlsScp):
    """A TLS Storage SCP accepting the node's Secondary Capture, SR and SEG outputs."""

    def __init__(self, cfg: TlsConfig) -> None:
        from pynetdicom import AllStoragePresentationContexts

        self.ae_title = "TLSPACS"
        self.port = free_port()
        self.stored = []
        self.subjects = []
        self._lock = threading.Lock()
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, ssl_context=server_context(cfg),
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)])


def test_node_receives_and_sends_over_tls(
        tmp_path: Path, pki: Pki, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    pacs = TlsPacs(server_cfg(pki, require_client_cert=True))
    try:
        config = make_config(
            tls={"enabled": True, "cert_file": str(pki.server_cert),
                 "key_file": str(pki.server_key), "ca_file": str(pki.ca),
                 "require_client_cert": True},
            destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                           "port": pacs.port,
                           # the node offers its own (server) certificate as a client
                           "tls": {"enabled": True, "ca_file": str(pki.ca),
                                   "cert_file": str(pki.server_cert),
                                   "key_file": str(pki.server_key)}}])
        node = start_node(config)
        source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=12), seed=11)
        # refused: plain TCP, no client certificate, a certificate from another CA
        assert tls_store(source[:1], node.receiver.port, None, called_ae="DICOMNODE") is None
        assert tls_store(source[:1], node.receiver.port,
                         client_cfg(pki, cert_file=None, key_file=None),
                         called_ae="DICOMNODE") is None
        assert tls_store(source[:1], node.receiver.port,
                         client_cfg(pki, cert_file=pki.other_client_cert,
                                    key_file=pki.other_client_key),
                         called_ae="DICOMNODE") is None
        # a trusted peer stores the series; the results come back over TLS
        statuses = tls_store(source, node.receiver.port, client_cfg(pki),
                             called_ae="DICOMNODE")
        assert statuses == [SUCCESS] * len(source)
        assert wait_for(lambda: len(pacs.stored) >= len(source) + 3, 180)
        assert pacs.subjects[0] is not None and "commonName=DICOMNODE" in pacs.subjects[0]
    finally:
        pacs.stop()
