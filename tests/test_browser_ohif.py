"""What a radiologist sees: a phantom T1C routed through the node by a real PACS (Orthanc
with its DICOMweb plugin), opened in OHIF (the prebuilt viewer of the npm package
``@ohif/app``) in headless Chromium, driven by Playwright.

Checked in the browser, each with a screenshot kept as an artefact (``build/browser/``
and the test's tmp dir): the fusion series renders with its burned-in banner; the SEG
loads as an overlay on the T1C with its lesion and background segments; the image-anchored
SR shows each lesion's outline with its TBRmax and TBRmean on the T1C slice.

Why Playwright for Python: it installs from PyPI like the rest of the test tools (its
driver ships inside the wheel), and it drives the Debian ``chromium`` through
``executable_path``, so nothing is downloaded at run time; puppeteer-core would need a
Node.js test runner beside pytest. ``make browser-test-deps`` installs the packages and
OHIF's ``dist/``. The test skips, naming what is missing, only when the browser, Orthanc's
DICOMweb plugin, Playwright or OHIF's build is absent.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.service import Node
from dicom_node.writers.sr import read_tbr_report
from storage.models import OutputInstance
from tests.conftest import free_port, wait_for, written_outputs
from tests.orthanc_peer import DICOMWEB_PLUGIN, OrthancProcess
from tests.test_orthanc import MODALITY, ORTHANC_AE, Orthanc, orthanc_config
from training.phantom import PhantomGeometry, generate_patient
from training.phantom_dicom import write_patient

REPO = Path(__file__).resolve().parents[1]
#: Where ``make browser-test-deps`` unpacks ``npm pack @ohif/app`` (its prebuilt viewer).
OHIF_DIST = Path(os.environ.get("OHIF_DIST", REPO / "build" / "ohif" / "package" / "dist"))
ARTEFACTS = REPO / "build" / "browser"
DEMO_WEIGHTS = REPO / "dicom_node" / "models" / "demo-generator.pt"
#: A phantom patient in which the demo model finds a lesion (checked below).
PATIENT_INDEX, PATIENT_SEED = 1000, 0

pytestmark = pytest.mark.slow


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on PATH (Debian package 'chromium'; make browser-test-deps)")


def _requirements() -> str:
    """The browser, skipping with the reason when something the test needs is absent."""
    browser = _chromium()
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc not installed (Debian package 'orthanc'; make system-packages)")
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"Orthanc's DICOMweb plugin missing ({DICOMWEB_PLUGIN}; Debian package "
                    "'orthanc-dicomweb'; make browser-test-deps)")
    if not (OHIF_DIST / "index.html").is_file():
        pytest.skip(f"OHIF's prebuilt viewer missing ({OHIF_DIST}; make browser-test-deps)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright for Python not installed (pip install -e '.[test]')")
    return browser


APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  disableConfirmationPrompts: true,
  showPatientInfo: 'visible',
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (browser test)',
      name: 'orthanc',
      wadoUriRoot: '/wado',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      dicomUploadEnabled: false,
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


class _ViewerHandler(http.server.BaseHTTPRequestHandler):
    """OHIF's static files (index.html for the app's own routes), our app-config.js, and
    Orthanc's DICOMweb and WADO under the same origin (no CORS to configure)."""

    dist: Path
    orthanc: str  # http://127.0.0.1:port

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith(("/dicom-web/", "/wado")):
            self._proxy()
            return
        if path == "/app-config.js":
            self._send(200, APP_CONFIG.encode(), "application/javascript")
            return
        file = (self.dist / path.lstrip("/")).resolve()
        if not file.is_relative_to(self.dist.resolve()) or not file.is_file():
            file = self.dist / "index.html"  # the app's own routes (/viewer, ...)
        types = {".js": "application/javascript", ".css": "text/css", ".html": "text/html",
                 ".wasm": "application/wasm", ".json": "application/json",
                 ".svg": "image/svg+xml", ".woff2": "font/woff2", ".png": "image/png"}
        self._send(200, file.read_bytes(), types.get(file.suffix, "application/octet-stream"))

    def _proxy(self) -> None:
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() in ("accept", "host", "range")}
        request = urllib.request.Request(self.orthanc + self.path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                body, status = answer.read(), answer.status
                content_type = answer.headers.get("Content-Type", "application/octet-stream")
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
            content_type = exc.headers.get("Content-Type", "text/plain")
        self._send(status, body, content_type)


@contextlib.contextmanager
def serve_viewer(orthanc_http_port: int) -> Iterator[str]:
    handler = type("Handler", (_ViewerHandler,),
                   {"dist": OHIF_DIST, "orthanc": f"http://127.0.0.1:{orthanc_http_port}"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def orthanc_with_dicomweb(tmp_path: Path,
                          orthanc_peer: Callable[[dict[str, Any]], OrthancProcess]
                          ) -> Callable[[int], Orthanc]:
    """``start(node_port)``: test_orthanc's Orthanc with the DICOMweb plugin (and WADO-URI)
    on, for OHIF."""

    def start(node_port: int) -> Orthanc:
        config = orthanc_config(tmp_path, free_port(), free_port(), node_port)
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                              "WadoRoot": "/wado", "Ssl": False}
        return Orthanc.of(orthanc_peer(config))

    return start


def _keep(shot: Path) -> Path:
    """A copy of a screenshot under build/browser/, where CI collects artefacts."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    kept = ARTEFACTS / shot.name
    shutil.copyfile(shot, kept)
    return kept


def _banner_pixels(png: Path) -> int:
    """Yellow pixels (the burned-in text's colour) in a screenshot."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 170) & (rgb[..., 1] > 170) & (rgb[..., 2] < 90)).sum())


def _tinted_pixels(png: Path) -> int:
    """Blue-tinted pixels inside the viewport (below its top overlay and cine bar, left of
    the side panel) of a 1600 x 1000 screenshot: the grey T1C has none."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)[200:950, 320:1290]
    return int(((rgb[..., 2] - rgb[..., 0] > 20) & (rgb[..., 1] > 60)).sum())


def test_ohif_shows_fusion_seg_and_tbr_measurements(
        tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node],
        orthanc_with_dicomweb: Callable[[int], Orthanc]) -> None:
    browser_path = _requirements()
    from playwright.sync_api import expect, sync_playwright

    # 1. the PACS holds a phantom T1C study and routes it to the node, whose results come
    #    back into the same study (as tests/test_orthanc.py, with the demo model, which
    #    finds the phantom's lesion)
    node_port = free_port()
    orthanc = orthanc_with_dicomweb(node_port)
    config = make_config(
        receiver={"port": node_port},
        model={"weights_path": str(DEMO_WEIGHTS)},
        analysis={"uncertainty_samples": 0},
        peers=[{"ae_title": ORTHANC_AE, "addresses": ["127.0.0.1"]}],
        destinations=[{"name": "orthanc", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}])
    node = start_node(config)
    patient = generate_patient(PATIENT_INDEX, PATIENT_SEED,
                               geometry=PhantomGeometry(slice_spacing_mm=4.0))
    t1c = write_patient(patient, tmp_path / "phantom").t1c
    for path in t1c:
        answer = json.loads(orthanc.request("POST", "/instances", path.read_bytes(),
                                            "application/dicom"))
    study_id = answer["ParentStudy"]
    study_uid = str(dcmread(t1c[0], stop_before_pixels=True).StudyInstanceUID)
    stored = orthanc.post_json(f"/modalities/{MODALITY}/store",
                               {"Resources": [study_id], "Synchronous": True})
    assert stored["FailedInstancesCount"] == 0, stored

    def outputs_in_orthanc() -> int:
        return len(orthanc.get_json(f"/studies/{study_id}/instances")) - len(t1c)

    def expected() -> int:
        with node.sessions() as session:
            return max(len(t1c) + 3, written_outputs(session))

    assert wait_for(lambda: outputs_in_orthanc() >= expected(), 300), (
        f"{outputs_in_orthanc()} of {expected()} outputs in Orthanc")
    assert expected() == len(t1c) + 4, "the demo model found no lesion: no image-anchored SR"

    # 2. OHIF, served beside Orthanc's DICOMweb, in headless Chromium
    shots: dict[str, Path] = {}
    console: list[str] = []
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with serve_viewer(orthanc.http_port) as viewer, sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=browser_path, headless=True,
            args=["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
                  "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            # the first-visit guided tour would cover the viewer
            page.add_init_script("localStorage.setItem('shownTours', "
                                 "JSON.stringify(['basicViewerTour']));")
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            page.goto(f"{viewer}/viewer?StudyInstanceUIDs={study_uid}", timeout=120_000)

            def thumbnail(description_start: str) -> Any:
                """A series in the study browser (image series show a thumbnail, SEG and
                SR a line with their description)."""
                return page.get_by_text(description_start).first

            # a. the fusion series, with its burned-in banner
            fusion = thumbnail("SYNTHETIC FDOPA PET")
            expect(fusion).to_be_visible(timeout=120_000)
            page.wait_for_timeout(5000)
            shots["study"] = tmp_path / "ohif-study.png"
            page.screenshot(path=str(shots["study"]))
            fusion.dblclick()
            shots["fusion"] = tmp_path / "ohif-fusion.png"

            def banner_on_screen() -> bool:
                page.screenshot(path=str(shots["fusion"]))
                return _banner_pixels(shots["fusion"]) > 300

            assert wait_for(banner_on_screen, 90, 2.0), "no burned-in banner on screen"

            # b. the SEG over the T1C: its segments listed, the overlay drawn
            thumbnail("TBR REGIONS (SEG)").dblclick()
            page.wait_for_timeout(3000)
            for button in ("Yes", "Load"):  # OHIF may ask before it hydrates the SEG
                candidate = page.get_by_role("button", name=button)
                if candidate.count():
                    candidate.first.click()
            panel = page.locator("[data-cy^='panelSegmentation'][data-cy$='-btn']").first
            if not page.get_by_text("TBR background").count():
                panel.click()  # the segmentation panel lists the SEG's segments
            expect(page.get_by_text("TBR background").first).to_be_visible(timeout=120_000)
            expect(page.get_by_text("Lesion 1: TBRmax").first).to_be_visible(timeout=60_000)
            shots["seg"] = tmp_path / "ohif-seg.png"

            def overlay_drawn() -> bool:  # the background region's slate blue on the T1C
                page.screenshot(path=str(shots["seg"]))
                return _tinted_pixels(shots["seg"]) > 2000

            assert wait_for(overlay_drawn, 60, 2.0), "no SEG overlay in the viewport"

            # c. the image-anchored SR: each lesion's outline and TBRs on its T1C slice
            thumbnail("TBR ON T1C SLICES").dblclick()
            page.wait_for_timeout(3000)
            expect(page.locator("svg text", has_text="TBRmax").first).to_be_visible(
                timeout=120_000)
            page.wait_for_timeout(2000)
            shots["sr"] = tmp_path / "ohif-sr.png"
            page.screenshot(path=str(shots["sr"]))
            labels = page.locator("svg text").all_text_contents()
            page.locator("[data-cy='trackedMeasurements-btn']").first.click()
            page.wait_for_timeout(3000)
            shots["measurements"] = tmp_path / "ohif-measurements.png"
            page.screenshot(path=str(shots["measurements"]))
            (ARTEFACTS / "measurement-panel.txt").write_text(page.inner_text("body"))
        finally:
            with contextlib.suppress(Exception):  # where it stood, when a step failed
                shots.setdefault("last", tmp_path / "ohif-last.png")
                page.screenshot(path=str(shots["last"]))
            browser.close()
            ARTEFACTS.mkdir(parents=True, exist_ok=True)
            (ARTEFACTS / "console.log").write_text("\n".join(console))
            for shot in shots.values():
                if shot.is_file():
                    _keep(shot)
    # the numbers on screen are the SR's (OHIF prints each NUM as "meaning: value unit")
    with node.sessions() as session:
        image_sr = session.scalars(select(OutputInstance.path).where(
            OutputInstance.kind == "sr-image")).one()
    report = read_tbr_report(dcmread(image_sr))
    text = " ".join(labels)
    for lesion in report.lesions:
        assert f"TBRmax: {lesion['tbr_max']:.2f}" in text, labels
        assert f"TBRmean: {lesion['tbr_mean']:.2f}" in text, labels
        assert f"Volume: {lesion['volume_ml']:.2f} mL" in text, labels
