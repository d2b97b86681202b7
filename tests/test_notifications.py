"""Notifications: a webhook and a FHIR server told what became of each series.

A real node, a real HTTP receiver of the test's own on loopback (it keeps every request
and can be told to fail), series that are processed, skipped, and whose results cannot
be delivered. Checked from the receiver's side: the bodies, the HMAC signature, the
retries, what identifies the patient and what does not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.errors import ConfigError
from dicom_node.outbox.notifications import signature
from dicom_node.service import Node
from storage.models import AuditEvent, Notification
from tests.conftest import free_port, pynetdicom_send, wait_for
from tests.dicom_factory import SeriesSpec, write_series

SECRET = b"webhook-shared-secret"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpReceiver:
    """Answers 204 to every POST, or 503 while ``failures`` > 0; keeps every request."""

    port: int = 0
    failures: int = 0
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def got(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    state = HttpReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                failing = state.failures > 0
                state.failures -= failing
                state.requests.append(Received(self.path, dict(self.headers), body))
            self.send_response(503 if failing else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _endpoints(tmp_path: Path, receiver: HttpReceiver) -> list[dict[str, Any]]:
    (tmp_path / "hook.secret").write_bytes(SECRET + b"\n")
    (tmp_path / "fhir.token").write_text("fhir-token\n")
    return [
        {"name": "ris-hook", "type": "webhook", "url": receiver.url("/hook"),
         "secret_file": str(tmp_path / "hook.secret")},
        {"name": "ris-hook-ids", "type": "webhook", "url": receiver.url("/hook-ids"),
         "secret_file": str(tmp_path / "hook.secret"), "events": ["done"],
         "include_patient_ids": True},
        {"name": "fhir", "type": "fhir", "url": receiver.url("/fhir/"),
         "bearer_token_file": str(tmp_path / "fhir.token")},
    ]


def test_webhook_and_fhir_hear_of_done_skipped_and_dead_series(
        database_url: str, tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], http_receiver: HttpReceiver) -> None:
    http_receiver.failures = 2  # the first two messages are answered 503: retried
    node = start_node(make_config(
        destinations=[{"name": "offline-pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": free_port()}],
        outbox={"max_attempts": 1},
        notifications=_endpoints(tmp_path, http_receiver)))

    t1c = write_series(tmp_path / "t1c", SeriesSpec(n_slices=10), seed=3)
    flair = write_series(tmp_path / "flair", SeriesSpec(n_slices=10, description="AX FLAIR"),
                         seed=4)
    assert set(pynetdicom_send(t1c + flair, node.receiver.port)) == {0}

    def events(path: str) -> dict[str, list[Received]]:
        out: dict[str, list[Received]] = {}
        for request in http_receiver.got(path):
            if request.headers.get("X-DicomNode-Event") is None:
                continue
            out.setdefault(request.headers["X-DicomNode-Event"], []).append(request)
        return out

    def delivered() -> bool:
        with node.sessions() as session:
            notes = list(session.scalars(select(Notification)))
        return (len(notes) >= 1 + 1 + 4 + 1 + 1
                and all(n.state == "sent" for n in notes))

    def summary() -> list[tuple[str, str, str, int]]:
        with node.sessions() as session:
            return [(n.endpoint, n.event, n.state, n.attempts)
                    for n in session.scalars(select(Notification))]

    assert wait_for(delivered, 120), summary()
    hook = events("/hook")
    t1c_uid = json.loads(hook["done"][-1].body)["series_instance_uid"]

    # done: the findings, signed, no patient identifier
    (done,) = {r.headers["X-DicomNode-Delivery"]: r for r in hook["done"]}.values()
    body = done.json()
    assert body["schema"] == "dicom-node.notification/1" and body["event"] == "done"
    assert body["findings"]["lesion_count"] == len(body["findings"]["lesions"])
    assert body["findings"]["model"].startswith("test-generator")
    assert "NOT FOR DIAGNOSTIC USE" in body["statement"]
    expected = "sha256=" + hmac.new(SECRET, done.body, hashlib.sha256).hexdigest()
    assert done.headers["X-DicomNode-Signature"] == expected == signature(SECRET, done.body)
    assert b"TEST0001" not in done.body and b"TEST^PATIENT" not in done.body

    # skipped: the FLAIR, with the node's reason
    (skipped,) = {r.headers["X-DicomNode-Delivery"]: r for r in hook["skipped"]}.values()
    assert skipped.json()["series_instance_uid"] != t1c_uid
    assert "flair" in skipped.json()["reason"].lower(), skipped.json()["reason"]
    for message in (done, skipped, *hook["dead_letter"]):  # the documented schema
        _check_schema(message.json())

    # dead letters: one message per output series (SC, SEG, SR, KOS), with the count
    dead = {r.headers["X-DicomNode-Delivery"]: r.json() for r in hook["dead_letter"]}
    assert len(dead) == 4
    assert sum(d["instances"] for d in dead.values()) == 10 + 3
    assert {d["destination"] for d in dead.values()} == {"offline-pacs"}
    assert {d["series_instance_uid"] for d in dead.values()} == {t1c_uid}  # the source

    # the two 503s were retried: the same delivery id and the same bytes again
    first_two = http_receiver.requests[:2]
    for failed in first_two:
        again = [r for r in http_receiver.requests[2:]
                 if r.headers["X-DicomNode-Delivery"] == failed.headers["X-DicomNode-Delivery"]
                 and r.path == failed.path]
        assert again and again[0].body == failed.body

    # include_patient_ids: that endpoint, and only that one, gets the Patient ID
    (with_ids,) = {r.headers["X-DicomNode-Delivery"]: r for r in events("/hook-ids")["done"]
                   }.values()
    assert with_ids.json()["patient_id"] == "TEST0001"

    # FHIR: a DiagnosticReport of the done series, referencing the study by its UID
    (report_request,) = {r.headers["X-DicomNode-Delivery"]: r
                         for r in http_receiver.got("/fhir/DiagnosticReport")}.values()
    assert report_request.headers["Authorization"] == "Bearer fhir-token"
    assert report_request.headers["Content-Type"] == "application/fhir+json"
    report = report_request.json()
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "preliminary"
    study_uid = body["study_instance_uid"]
    assert report["imagingStudy"][0]["identifier"] == {"system": "urn:dicom:uid",
                                                       "value": f"urn:oid:{study_uid}"}
    assert len(report["result"]) == 2 * body["findings"]["lesion_count"]
    assert all(c["resourceType"] == "Observation" for c in report["contained"])
    assert "NOT FOR DIAGNOSTIC USE" in report["conclusion"]
    assert "subject" not in report and b"TEST0001" not in report_request.body

    # the operator sees them per endpoint (dicom-node status; /metrics shares the query)
    from dicom_node.ops.status import format_status, node_status
    report = node_status(node.config, node.sessions)
    assert report["notifications"]["ris-hook"] == {"pending": 0, "retrying": 0, "dead": 0,
                                                   "sent": 6}  # done, skipped, 4 dead
    assert report["notifications"]["fhir"]["sent"] == 1
    assert "notifications:" in format_status(report)

    with node.sessions() as session:
        audited = list(session.scalars(select(AuditEvent).where(
            AuditEvent.kind == "notify.send")))
    assert sum(e.outcome == "error" for e in audited) == 2
    assert sum(e.outcome == "ok" for e in audited) == 8


def _check_schema(body: dict[str, Any]) -> None:
    """The body against docs/notification.schema.json: required keys, no others, the
    event's own keys (jsonschema is not a dependency: the schema's top level by hand)."""
    schema = json.loads((Path(__file__).resolve().parents[1] / "docs"
                         / "notification.schema.json").read_text())
    assert set(schema["required"]) <= set(body) <= set(schema["properties"]), body.keys()
    assert body["event"] in schema["properties"]["event"]["enum"]
    assert set(body["node"]) == set(schema["properties"]["node"]["required"])
    if body["event"] == "done":
        findings = schema["properties"]["findings"]
        assert set(findings["required"]) <= set(body["findings"]) <= set(findings["properties"])
    if body["event"] == "dead_letter":
        assert {"destination", "instances", "reason"} <= set(body)


def test_a_restarted_node_does_not_repeat_or_flood(
        database_url: str, tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], http_receiver: HttpReceiver) -> None:
    """A node that processed series before notifications were configured does not send
    their history; after a restart it neither repeats nor skips a message."""
    plain = make_config()
    first = start_node(plain)
    old = write_series(tmp_path / "old", SeriesSpec(n_slices=8), seed=8)
    assert set(pynetdicom_send(old, first.receiver.port)) == {0}

    def state_of(node: Node, count: int) -> bool:
        with node.sessions() as session:
            done = session.scalars(select(AuditEvent).where(
                AuditEvent.kind == "series.state", AuditEvent.detail.contains('"to": "done"')))
            return len(list(done)) >= count

    assert wait_for(lambda: state_of(first, 1), 120)
    first.stop()
    config = make_config(notifications=_endpoints(tmp_path, http_receiver)[:1])
    second = start_node(config)
    new = write_series(tmp_path / "new", SeriesSpec(n_slices=8), seed=9)
    assert set(pynetdicom_send(new, second.receiver.port)) == {0}
    assert wait_for(lambda: len(http_receiver.got("/hook")) >= 1, 120)
    second.stop()
    third = start_node(config)
    newest = write_series(tmp_path / "newest", SeriesSpec(n_slices=8), seed=10)
    assert set(pynetdicom_send(newest, third.receiver.port)) == {0}
    assert wait_for(lambda: len(http_receiver.got("/hook")) >= 2, 120)
    assert wait_for(lambda: state_of(third, 3), 60)
    with third.sessions() as session:
        notes = list(session.scalars(select(Notification)))
    assert len(notes) == 2 and all(n.state == "sent" for n in notes)
    sent_for = [r.json()["series_instance_uid"] for r in http_receiver.got("/hook")]
    assert len(sent_for) == len(set(sent_for)) == 2


def test_config_checks_notification_endpoints(tmp_path: Path,
                                              make_config: Callable[..., NodeConfig]) -> None:
    (tmp_path / "s").write_text("x")
    good = {"name": "hook", "url": "https://ris.example/hook", "secret_file": "s"}
    (endpoint,) = make_config(notifications=[good]).notifications
    assert endpoint.events == ("done", "skipped", "failed", "dead_letter")
    assert endpoint.secret_file == tmp_path / "s" and not endpoint.include_patient_ids
    fhir = make_config(notifications=[{"name": "f", "type": "fhir",
                                       "url": "https://fhir.example/r4"}]).notifications[0]
    assert fhir.events == ("done",)
    for bad, match in (({"secret_file": None}, "secret_file is required"),
                       ({"url": "ris.example"}, "not an http"),
                       ({"events": ["done", "sent"]}, "not among"),
                       ({"type": "email"}, "type 'email'"),
                       ({"secret_file": "missing"}, "cannot read")):
        item = {k: v for k, v in {**good, **bad}.items() if v is not None}
        with pytest.raises(ConfigError, match=match):
            make_config(notifications=[item])
    with pytest.raises(ConfigError, match="done only"):
        make_config(notifications=[{"name": "f", "type": "fhir", "url": "https://x",
                                    "events": ["failed"]}])
