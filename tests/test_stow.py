"""DICOMweb destinations: the node's results by STOW-RS into a real DICOMweb server.

Orthanc with its DICOMweb plugin (Debian ``orthanc``, ``orthanc-dicomweb``) is started
with HTTP basic authentication; the node receives a T1C series, processes it and stores
SC, SEG and SR through ``POST /dicom-web/studies``. What the server holds is read back
the way a DICOMweb client would (QIDO-RS, WADO-RS) and compared byte for byte with the
node's files. The per-instance answer handling is checked against a small STOW-RS
server of the test's own that answers what Orthanc cannot be made to answer.
"""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.config import Destination, NodeConfig, NotificationEndpoint
from dicom_node.errors import ConfigError
from dicom_node.outbox.stow import (
    FAILED_SOP_SEQUENCE,
    REFERENCED_SOP_SEQUENCE,
    MultipartFiles,
    StowUnavailable,
    outcomes_of,
    tls_verify,
)
from dicom_node.service import Node
from storage.models import AuditEvent, OutboxEntry, OutputInstance, Series
from tests.conftest import free_port, pynetdicom_send, wait_for
from tests.dicom_factory import SeriesSpec, write_series
from tests.orthanc_peer import DICOMWEB_PLUGIN, OrthancProcess

USER, PASSWORD = "dicomnode", "s3cret-stow"


@dataclass
class DicomWebServer:
    """Orthanc's DICOMweb service, read as the node's user."""

    orthanc: OrthancProcess

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.orthanc.http_port}/dicom-web"

    def get(self, path: str, accept: str = "application/dicom+json") -> tuple[str, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.orthanc.http_port}{path}",
                                         headers={"Accept": accept,
                                                  **self.orthanc.auth_headers()})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.headers.get("Content-Type", ""), response.read()

    def get_json(self, path: str) -> Any:
        return json.loads(self.get(path)[1] or b"[]")


@pytest.fixture
def dicomweb_orthanc(tmp_path: Path,
                     orthanc_peer: Callable[[dict[str, Any]], OrthancProcess]
                     ) -> DicomWebServer:
    """Orthanc with its DICOMweb plugin and HTTP basic authentication (USER), no DICOM."""
    return DicomWebServer(orthanc_peer({
        "Name": "dicom-node-stow-test",
        "StorageDirectory": str(tmp_path / "orthanc" / "storage"),
        "IndexDirectory": str(tmp_path / "orthanc" / "index"),
        "HttpPort": free_port(), "DicomPort": free_port(), "DicomServerEnabled": False,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False,
    }))


def _dicomweb_destination(url: str, credentials: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "cloud", "type": "dicomweb", "url": url,
            "basic_auth_file": str(credentials), **extra}


def _multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    message = BytesParser().parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts: list[bytes] = []
    for part in message.get_payload():
        assert not isinstance(part, str)
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append(payload)
    return parts


def test_results_reach_a_dicomweb_server_byte_for_byte(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], dicomweb_orthanc: DicomWebServer) -> None:
    credentials = tmp_path / "stow.credentials"
    credentials.write_text("dicomnode:wrong-password\n")
    credentials.chmod(0o600)
    node = start_node(make_config(
        destinations=[_dicomweb_destination(dicomweb_orthanc.base_url, credentials)]))
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=10), seed=5)
    assert set(pynetdicom_send(source, node.receiver.port)) == {0}
    study_uid = str(dcmread(source[0], stop_before_pixels=True).StudyInstanceUID)

    # 1. a wrong password: the server answers 401, every entry waits for a retry
    def entries() -> list[OutboxEntry]:
        with node.sessions() as session:
            return list(session.scalars(select(OutboxEntry)))

    assert wait_for(lambda: bool(entries()) and all(e.attempts >= 1 for e in entries()), 120)
    assert {e.state for e in entries()} == {"pending"}
    assert all("HTTP 401" in e.last_error for e in entries()), entries()[0].last_error
    assert dicomweb_orthanc.get_json("/dicom-web/studies") == []

    # 2. the admin fixes the credentials file: the next retry reads it, nothing restarts
    credentials.write_text(f"{USER}:{PASSWORD}\n")
    assert wait_for(lambda: all(e.state == "sent" for e in entries()), 120), \
        {e.last_error for e in entries()}
    with node.sessions() as session:
        outputs = {o.sop_uid: Path(o.path) for o in session.scalars(select(OutputInstance))}
        sends = list(session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "send.attempt", AuditEvent.outcome == "ok")))
    assert len(outputs) == 10 + 3  # an SC per slice, the SEG, the SR and the KOS
    assert len(sends) == len(outputs)
    assert all(dicomweb_orthanc.base_url in e.peer for e in sends)

    # 3. what the server holds, through QIDO-RS and WADO-RS, is what the node wrote
    series = dicomweb_orthanc.get_json(f"/dicom-web/studies/{study_uid}/series")
    output_series = {str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                     for p in outputs.values()}
    assert output_series <= {s["0020000E"]["Value"][0] for s in series}
    held: dict[str, bytes] = {}
    for series_uid in output_series:
        content_type, body = dicomweb_orthanc.get(
            f"/dicom-web/studies/{study_uid}/series/{series_uid}",
            accept='multipart/related; type="application/dicom"; transfer-syntax=*')
        for part in _multipart_parts(content_type, body):
            held[str(dcmread(_bytes_file(tmp_path, part), stop_before_pixels=True)
                     .SOPInstanceUID)] = part
    assert set(held) == set(outputs)
    for sop_uid, path in outputs.items():
        assert held[sop_uid] == path.read_bytes(), f"{sop_uid} differs from the node's file"


def _bytes_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "part.dcm"
    path.write_bytes(data)
    return path


def test_a_server_that_cannot_be_reached_is_retried_with_the_real_reason(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    credentials = tmp_path / "token"
    credentials.write_text("a-token\n")
    node = start_node(make_config(destinations=[{
        "name": "cloud", "type": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicomweb",
        "bearer_token_file": str(credentials)}]))
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=6)
    assert set(pynetdicom_send(source, node.receiver.port)) == {0}

    def entries() -> list[OutboxEntry]:
        with node.sessions() as session:
            return list(session.scalars(select(OutboxEntry)))

    assert wait_for(lambda: bool(entries()) and all(e.attempts >= 2 for e in entries()), 120)
    assert {e.state for e in entries()} == {"pending"}
    assert all("cannot connect" in e.last_error and "refused" in e.last_error.lower()
               for e in entries()), entries()[0].last_error


class _StowStub(BaseHTTPRequestHandler):
    """Answers every STOW-RS request from the test's script; keeps what it received."""

    script: Callable[[list[str]], tuple[int, dict[str, Any]]]
    received: list[tuple[dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        uids = [str(dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)
                for part in _multipart_parts(self.headers["Content-Type"], body)]
        status, answer = self.script(uids)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def _stow_stub(tmp_path: Path, script: Callable[[list[str]], tuple[int, dict[str, Any]]]
               ) -> Iterator[dict[str, Any]]:
    """The test's STOW-RS server answering from ``script`` (and keeping what it received
    in ``_StowStub.received``), as a node's destination with a bearer token."""
    _StowStub.script = staticmethod(script)
    _StowStub.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StowStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    try:
        yield {"name": "cloud", "type": "dicomweb",
               "url": f"http://127.0.0.1:{server.server_address[1]}/wado/",
               "bearer_token_file": str(token)}
    finally:
        server.shutdown()
        server.server_close()


def _item(uid: str, tag: str | None = None, code: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if tag is not None:
        item[tag] = {"vr": "US", "Value": [code]}
    return item


def test_each_instance_gets_the_outcome_the_server_gave_it(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """The first answer: one instance refused for good (0xA900), one for lack of room
    (0xA700, retried), one stored with a warning, one not mentioned (retried), the rest
    stored. The second answer stores whatever is sent again."""
    calls: list[list[str]] = []

    def script(uids: list[str]) -> tuple[int, dict[str, Any]]:
        calls.append(uids)
        if len(calls) > 1:
            return 200, {REFERENCED_SOP_SEQUENCE: {"vr": "SQ",
                                                   "Value": [_item(u) for u in uids]}}
        refused, full, warned, _silent, *rest = uids
        return 202, {
            FAILED_SOP_SEQUENCE: {"vr": "SQ", "Value": [_item(refused, "00081197", 0xA900),
                                                        _item(full, "00081197", 0xA700)]},
            REFERENCED_SOP_SEQUENCE: {"vr": "SQ", "Value": [_item(warned, "00081196", 0xB000)]
                                      + [_item(u) for u in rest]}}

    with _stow_stub(tmp_path, script) as destination:
        node = start_node(make_config(destinations=[destination]))
        source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=7)
        assert set(pynetdicom_send(source, node.receiver.port)) == {0}
        assert wait_for(lambda: len(calls) >= 2, 120)

        def by_uid() -> dict[str, OutboxEntry]:
            with node.sessions() as session:
                return {uid: entry for entry, uid in session.execute(
                    select(OutboxEntry, OutputInstance.sop_uid).join(
                        OutputInstance, OutputInstance.id == OutboxEntry.output_id))}

        assert wait_for(lambda: all(e.state != "pending" for e in by_uid().values()), 60)
    refused, full, warned, silent, *rest = calls[0]
    entries = by_uid()
    assert len(calls[0]) == len(entries) == 8 + 3
    assert entries[refused].state == "dead" and entries[refused].last_status == 0xA900
    assert "refused by destination" in entries[refused].last_error
    assert entries[warned].state == "sent" and entries[warned].last_status == 0xB000
    assert all(entries[u].state == "sent" and entries[u].attempts == 1 for u in rest)
    # sent again, and only they, once each: the one without room and the one the answer
    # left out (each on its own backoff: in one request or two)
    again = [uid for call in calls[1:] for uid in call]
    assert sorted(again) == sorted([full, silent])
    assert entries[full].state == entries[silent].state == "sent"
    assert entries[full].attempts == entries[silent].attempts == 2
    headers, body = _StowStub.received[0]
    assert headers["Authorization"] == "Bearer t0ken"
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert int(headers["Content-Length"]) == len(body)
    assert _StowStub.received[0][0].get("Transfer-Encoding") is None  # not chunked


def test_a_stopping_sender_sends_no_further_stow_request(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node]) -> None:
    """Told to stop after its first STOW-RS request of a batch, the sender makes no other
    (HTTP timeouts alone would let a stop wait for every request left): the rest is
    released (due again, no attempt counted) and sent once the sender goes on."""
    calls: list[list[str]] = []
    held = threading.Event()

    def script(uids: list[str]) -> tuple[int, dict[str, Any]]:
        calls.append(uids)
        held.set()  # the stop arrives while the first request is answered
        return 200, {REFERENCED_SOP_SEQUENCE: {"vr": "SQ", "Value": [_item(u) for u in uids]}}

    with _stow_stub(tmp_path, script) as destination:
        node = start_node(make_config(destinations=[
            {**destination, "max_instances_per_request": 2}]))
        # held until the series is done, so that the first pass claims every output
        held.set()
        node.sender.stopping = held
        source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=8), seed=7)
        assert set(pynetdicom_send(source, node.receiver.port)) == {0}

        def entries() -> list[OutboxEntry]:
            with node.sessions() as session:
                return list(session.scalars(select(OutboxEntry)))

        def series_done() -> bool:
            with node.sessions() as session:
                return [str(s) for s in session.scalars(select(Series.state))] == ["done"]

        assert wait_for(series_done, 300)
        assert len(entries()) == 8 + 3
        assert not calls
        held.clear()

        def released() -> list[OutboxEntry]:
            return [e for e in entries() if e.claimed_by == node.node_id
                    and e.state == "pending" and e.lease_until is None]

        assert wait_for(lambda: len(released()) == 8 + 3 - 2, 120)
        assert len(calls) == 1 and len(calls[0]) == 2
        assert all(e.attempts == 0 for e in released()), "a stop counted as an attempt"

        def go_on(uids: list[str]) -> tuple[int, dict[str, Any]]:
            calls.append(uids)
            return 200, {REFERENCED_SOP_SEQUENCE: {"vr": "SQ",
                                                   "Value": [_item(u) for u in uids]}}

        _StowStub.script = staticmethod(go_on)
        held.clear()  # the sender goes on: everything arrives, once
        assert wait_for(lambda: all(e.state == "sent" for e in entries()), 120)
    sent = [uid for call in calls for uid in call]
    assert len(sent) == len(set(sent)) == 8 + 3, "an instance sent twice or not at all"


def test_multipart_body_streams_the_files_as_written(tmp_path: Path) -> None:
    files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=3), seed=2)
    body = MultipartFiles(files, "b0undary")
    data = b""
    while chunk := body.read(1000):  # small reads cross the part boundaries
        data += chunk
    assert len(data) == len(body)
    parts = _multipart_parts('multipart/related; type="application/dicom"; boundary=b0undary',
                             data)
    assert parts == [p.read_bytes() for p in files]


def test_outcomes_of_answers_that_fail_the_whole_request() -> None:
    for status, text in ((401, ""), (503, "busy"), (404, "<html>not found</html>")):
        with pytest.raises(StowUnavailable, match=f"HTTP {status}"):
            outcomes_of(status, "Reason", text, ["1.2"])
    with pytest.raises(StowUnavailable, match="not DICOM JSON"):
        outcomes_of(200, "OK", "<html/>", ["1.2"])
    # 200 with an empty body: every instance stored
    assert [o.stored for o in outcomes_of(200, "OK", "", ["1.2", "1.3"])] == [True, True]
    # 409: nothing stored, each failure with its reason
    (failed,) = outcomes_of(409, "Conflict", json.dumps(
        {FAILED_SOP_SEQUENCE: {"vr": "SQ", "Value": [_item("1.2", "00081197", 0xC000)]}}),
        ["1.2"])
    assert not failed.stored and failed.status == 0xC000


def test_tls_verify_is_one_rule_for_destinations_and_notification_endpoints() -> None:
    """The CA file when given, the system's CAs when not, nothing when turned off; the
    same for a DICOMweb destination and a webhook (one function decides for both)."""
    ca = Path("/etc/dicom-node/ca.pem")
    for make in (Destination, NotificationEndpoint):
        assert tls_verify(make(name="x")) is True
        assert tls_verify(make(name="x", ca_file=ca)) == str(ca)
        assert tls_verify(make(name="x", ca_file=ca, verify_tls=False)) is False


def test_config_checks_dicomweb_destinations(tmp_path: Path,
                                             make_config: Callable[..., NodeConfig]) -> None:
    token = tmp_path / "token"
    token.write_text("x")
    good = {"name": "cloud", "type": "dicomweb", "url": "https://pacs.example/dicom-web/",
            "bearer_token_file": "token"}
    config = make_config(destinations=[good])
    (dest,) = config.destinations
    assert dest.is_dicomweb and dest.url == "https://pacs.example/dicom-web"
    assert dest.bearer_token_file == token and dest.verify_tls
    for bad, match in (
            ({"url": "pacs.example"}, "not an http"),
            ({"type": "fhir"}, "type 'fhir'"),
            ({"basic_auth_file": "token"}, "not both"),
            ({"bearer_token_file": "missing"}, "bearer_token_file: cannot read"),
            ({"ae_title": "PACS"}, "takes url"),
            ({"http_timeout_s": 0}, "http_timeout_s")):
        with pytest.raises(ConfigError, match=match):
            make_config(destinations=[{**good, **bad}])
    with pytest.raises(ConfigError, match="belong to a destination of type"):
        make_config(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                   "port": 104, "url": "http://x"}])


def test_echo_checks_a_dicomweb_destination_with_its_credentials(
        tmp_path: Path, test_weights: Path, dicomweb_orthanc: DicomWebServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    credentials = tmp_path / "stow.credentials"
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "node"}"\n'
        f'[model]\nweights_path = "{test_weights}"\n'
        f'[[destinations]]\nname = "cloud"\ntype = "dicomweb"\n'
        f'url = "{dicomweb_orthanc.base_url}"\nbasic_auth_file = "{credentials}"\n')
    credentials.write_text(f"{USER}:not-the-password\n")
    assert main(["echo", "--config", str(config)]) == 1
    assert "QIDO-RS search): FAILED: HTTP 401" in capsys.readouterr().out
    credentials.write_text(f"{USER}:{PASSWORD}\n")
    assert main(["echo", "--config", str(config)]) == 0
    assert f"DICOMweb {dicomweb_orthanc.base_url} (QIDO-RS search): ok" in capsys.readouterr().out
