"""A real PACS round trip: Orthanc sends a T1C study to the node and gets the results back.

Orthanc (Debian package ``orthanc``) runs on loopback with a generated configuration
that knows the node as a DICOM modality. Everything is checked through Orthanc's REST
API, the way a PACS administrator would look.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.service import Node
from storage.models import OutboxEntry, OutputInstance, Series
from tests.conftest import free_port, wait_for, written_outputs
from tests.dicom_factory import SeriesSpec, write_series
from tests.orthanc_peer import OrthancProcess, require_orthanc

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
NODE_AE = "DICOMNODE"
ORTHANC_AE = "ORTHANC"
MODALITY = "dicomnode"  # the node's name in Orthanc's DicomModalities


@dataclass
class Orthanc:
    """Orthanc's REST API, as an administrator would use it."""

    http_port: int
    dicom_port: int
    log_path: Path

    @classmethod
    def of(cls, process: OrthancProcess) -> Orthanc:
        return cls(process.http_port, process.dicom_port, process.log_path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url(path), data=body, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            log = self.log_path.read_text(errors="replace")[-2000:]
            raise AssertionError(f"{method} {path}: HTTP {exc.code} {detail}\n{log}") from exc

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        return json.loads(self.request("POST", path, json.dumps(payload).encode()))


def orthanc_config(tmp_path: Path, http_port: int, dicom_port: int,
                   node_port: int) -> dict[str, Any]:
    return {
        "Name": "dicom-node-test",
        "StorageDirectory": str(tmp_path / "orthanc" / "storage"),
        "IndexDirectory": str(tmp_path / "orthanc" / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "Plugins": [],
        "DicomModalities": {MODALITY: [NODE_AE, "127.0.0.1", node_port]},
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": False,   # only known modalities may store into it
        "DicomCheckModalityHost": True,
        "StableAge": 1,
        "DicomScuTimeout": 60,            # a busy CI machine must not fail the store
        "SaveJobs": False,
    }


@pytest.fixture
def start_orthanc(tmp_path: Path, orthanc_peer: Callable[[dict[str, Any]], OrthancProcess]
                  ) -> Callable[[int], Orthanc]:
    """``start(node_port)``: Orthanc knowing the node (on that port) as a modality."""
    require_orthanc()

    def start(node_port: int) -> Orthanc:
        return Orthanc.of(orthanc_peer(orthanc_config(tmp_path, free_port(), free_port(),
                                                      node_port)))

    return start


def _series_by_sop_class(orthanc: Orthanc, study_id: str) -> dict[str, list[str]]:
    """SOP Class UID -> instance ids, over every series of the study."""
    found: dict[str, list[str]] = {}
    for series_id in orthanc.get_json(f"/studies/{study_id}")["Series"]:
        for instance_id in orthanc.get_json(f"/series/{series_id}")["Instances"]:
            tags = orthanc.get_json(f"/instances/{instance_id}/simplified-tags")
            found.setdefault(str(tags["SOPClassUID"]), []).append(instance_id)
    return found


def test_orthanc_sends_a_study_and_gets_sc_sr_seg_back(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node],
        start_orthanc: Callable[[int], Orthanc]) -> None:
    node_port = free_port()
    # Orthanc's DICOM port is only known once it is chosen: start Orthanc first, then the
    # node with Orthanc as its allowed peer and its destination.
    orthanc = start_orthanc(node_port)
    config = make_config(
        receiver={"port": node_port},
        peers=[{"ae_title": ORTHANC_AE, "addresses": ["127.0.0.1"]}],
        destinations=[{"name": "orthanc", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}])
    node = start_node(config)
    assert node.receiver.port == node_port

    # 1. the T1C study arrives in the PACS (REST upload, as a scanner would C-STORE)
    source = write_series(tmp_path / "t1c", SeriesSpec(n_slices=12), seed=11)
    for path in source:
        answer = json.loads(orthanc.request("POST", "/instances", path.read_bytes(),
                                            "application/dicom"))
        assert answer["Status"] == "Success", answer
    study_id = answer["ParentStudy"]
    source_uid = str(dcmread(source[0], stop_before_pixels=True).StudyInstanceUID)
    assert orthanc.get_json(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"] \
        == source_uid

    # 2. the PACS routes it to the node (Orthanc's C-STORE SCU)
    echo = orthanc.request("POST", f"/modalities/{MODALITY}/echo", b"{}")
    assert echo is not None
    stored = orthanc.post_json(f"/modalities/{MODALITY}/store",
                               {"Resources": [study_id], "Synchronous": True})
    assert stored["FailedInstancesCount"] == 0, stored
    assert stored["InstancesCount"] == len(source), stored

    # 3. the node's results land in the same study in the PACS: source + SC per slice +
    # SEG + SR, and the image-anchored SR when the model drew a lesion
    def expected() -> int:
        with node.sessions() as session:
            return len(source) + max(len(source) + 3, written_outputs(session))

    def instance_count() -> int:
        return len(orthanc.get_json(f"/studies/{study_id}/instances"))

    assert wait_for(lambda: instance_count() >= expected(), 60), (
        f"{instance_count()} of {expected()} instances in Orthanc\n"
        + orthanc.log_path.read_text()[-3000:])
    with node.sessions() as session:
        image_reports = len(session.scalars(select(OutputInstance).where(
            OutputInstance.kind == "sr-image")).all())
    by_class = _series_by_sop_class(orthanc, study_id)
    assert len(by_class[SecondaryCaptureImageStorage]) == len(source)
    assert len(by_class[COMPREHENSIVE_3D_SR]) == 1 + image_reports
    assert len(by_class[SegmentationStorage]) == 1
    assert instance_count() == expected()  # nothing duplicated
    # one study, five series (source, SC, SR, SEG, KOS) and the image SR's, all under
    # the source StudyInstanceUID
    assert len(orthanc.get_json("/studies")) == 1
    assert len(orthanc.get_json(f"/studies/{study_id}")["Series"]) == 5 + image_reports

    # 4. the PACS renders a fusion image: a PNG with real content, in colour
    sc_id = by_class[SecondaryCaptureImageStorage][len(source) // 2]
    png = orthanc.request("GET", f"/instances/{sc_id}/preview")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    assert image.shape[:2] == (64, 64)
    assert image.std() > 10.0, f"preview looks blank (std {image.std():.1f})"
    channel_spread = np.abs(image[..., 0] - image[..., 2]).mean()
    assert channel_spread > 1.0, "preview has no colour: is the fusion overlay missing?"

    # 5. the PACS routes the whole study again (a retry, or an auto-route rule), with the
    # node's own SC, SEG and SR in it: every instance is accepted, the T1C resend changes
    # nothing, the node's results are stored and not processed, and nothing new reaches
    # the PACS.
    again = orthanc.post_json(f"/modalities/{MODALITY}/store",
                              {"Resources": [study_id], "Synchronous": True})
    assert again["FailedInstancesCount"] == 0, again
    assert again["InstancesCount"] == expected(), again
    with node.sessions() as session:
        series_rows = {row.series_uid: row for row in session.scalars(select(Series))}
        outbox_before = len(session.scalars(select(OutboxEntry)).all())
    source_series = str(dcmread(source[0], stop_before_pixels=True).SeriesInstanceUID)
    assert len(series_rows) == 5 + image_reports
    assert series_rows[source_series].version == 1

    def returned_series_skipped() -> bool:
        with node.sessions() as session:
            return all(row.state == "skipped" for row in session.scalars(select(Series))
                       if row.series_uid != source_series)

    assert wait_for(returned_series_skipped, 120)
    with node.sessions() as session:
        source_row = session.scalars(select(Series).where(
            Series.series_uid == source_series)).one()
        assert (source_row.state, source_row.version) == ("done", 1)
        assert len(session.scalars(select(OutboxEntry)).all()) == outbox_before
    assert instance_count() == expected()
